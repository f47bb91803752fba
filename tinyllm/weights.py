"""Weights: the only module that knows weight file formats.

Reads safetensors (single file, or sharded through `model.safetensors.index.json` — never a
glob, since Mistral repos also hold `consolidated.safetensors`) by parsing the header and
memory-mapping the data: f32 / f16 / bf16 (bf16 through ml_dtypes, no torch). Maps HF and
Mistral-native names to one internal layout, undoes the native Q/K interleave, checks every
tensor's presence and shape, and hands each tensor to the backend, which casts it to its
compute dtype.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import TinyLLMError

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

# Tensors some checkpoints carry that the model does not use.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Mistral native name -> HF name ("{i}" is the layer index).
NATIVE_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}


@dataclass
class LayerWeights:
    attn_norm: object   # (dim,)
    wq: object          # (n_heads*head_dim, dim)
    wk: object          # (n_kv_heads*head_dim, dim)
    wv: object          # (n_kv_heads*head_dim, dim)
    wo: object          # (dim, n_heads*head_dim)
    ffn_norm: object    # (dim,)
    w1: object          # gate_proj (hidden_dim, dim)
    w2: object          # down_proj (dim, hidden_dim)
    w3: object          # up_proj   (hidden_dim, dim)
    bq: object = None   # (n_heads*head_dim,)   Qwen2 only
    bk: object = None   # (n_kv_heads*head_dim,)
    bv: object = None   # (n_kv_heads*head_dim,)
    # Fused on backends that fuse (cuda: one GEMV each at decode); wq/wk/wv, bq/bk/bv and
    # w1/w3 are then row views of these.
    wqkv: object = None  # rows [wq; wk; wv]
    bqkv: object = None  # [bq; bk; bv]
    w13: object = None   # rows [w1; w3]


@dataclass
class Weights:
    embed: object                 # (vocab_size, dim)
    layers: list[LayerWeights]
    norm: object                  # (dim,)
    lm_head: object               # (vocab_size, dim); the embedding table itself when tied
    nbytes_on_disk: int = 0
    dtypes: set = field(default_factory=set)


# ---- safetensors ------------------------------------------------------------------------

class SafetensorsFile:
    """Header + memmap of one .safetensors file; tensors are zero-copy numpy views."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ValueError(f"header claims {n} bytes but the file has {size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise TinyLLMError(f"{path} is not a valid safetensors file ({e}); re-download it") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise TinyLLMError(f"{path} is truncated: needs {self.data_start + end} bytes, has {size}; re-download it")
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def tensor(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in ST_DTYPES:
            raise TinyLLMError(f"{self.path}: tensor {name} has dtype {e['dtype']}; supported: F32, F16, BF16")
        a, b = e["data_offsets"]
        raw = self.mm[self.data_start + a:self.data_start + b]
        return raw.view(ST_DTYPES[e["dtype"]]).reshape(e["shape"])


class TensorIndex(dict):
    """HF tensor name -> (file, name in that file). `native` is True when the names were
    mapped from Mistral's consolidated.safetensors (whose wq/wk rows are interleaved)."""
    native: bool = False


def open_checkpoint(model_dir: Path) -> TensorIndex:
    """HF: model.safetensors.index.json or model.safetensors; Mistral native:
    consolidated.safetensors (names mapped to HF, `native` set)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise TinyLLMError(f"{index} is not a valid index ({e}); re-download it") from None
        files = {}
        for fname in sorted(set(wmap.values())):
            p = model_dir / fname
            if not p.is_file():
                raise TinyLLMError(f"{p} is named in {index.name} but missing; re-download the model")
            files[fname] = SafetensorsFile(p)
        return TensorIndex({name: (files[f], name) for name, f in wmap.items()})
    single = model_dir / "model.safetensors"
    if single.is_file():
        f = SafetensorsFile(single)
        return TensorIndex({name: (f, name) for name in f.entries})
    native = model_dir / "consolidated.safetensors"
    if native.is_file() and (model_dir / "params.json").is_file():
        f = SafetensorsFile(native)
        index = TensorIndex({_native_to_hf(name): (f, name) for name in f.entries})
        index.native = True
        return index
    raise TinyLLMError(f"{model_dir} has no model.safetensors, model.safetensors.index.json or "
                       f"consolidated.safetensors; .bin/.pth checkpoints are not supported (convert to safetensors)")


def _native_to_hf(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    key, i = (f"layers.{{i}}.{m.group(2)}", m.group(1)) if m else (name, "")
    return NATIVE_TO_HF[key].format(i=i) if key in NATIVE_TO_HF else name


def unpermute_native(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Native (interleaved-pair RoPE) wq/wk rows -> HF rotate-half rows, per head.
    Within a head, native row 2j / 2j+1 is the pair (j); HF puts it at rows j and j + d/2.
    (The inverse of transformers' convert_mistral_weights_to_hf `permute`.)"""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out_dim, dim)


# ---- expected tensors --------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv, h = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d),
            p + "mlp.down_proj.weight": (d, h),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def detect_config(cfg: ModelConfig, names) -> ModelConfig:
    """Facts the tensors tell better than config.json: Qwen2 carries q/k/v biases without an
    `attention_bias` key; a checkpoint without lm_head.weight is tied."""
    from dataclasses import replace
    names = set(names)
    if "model.layers.0.self_attn.q_proj.bias" in names and not cfg.qkv_bias:
        cfg = replace(cfg, qkv_bias=True)
    if "lm_head.weight" not in names and not cfg.tie_embeddings:
        cfg = replace(cfg, tie_embeddings=True)
    return cfg


def validate(cfg: ModelConfig, tensors: dict, model_dir: Path) -> None:
    want = expected_shapes(cfg)
    have = {n: tuple(f.entries[k]["shape"]) for n, (f, k) in tensors.items() if not IGNORED.search(n)}
    if cfg.tie_embeddings:
        have.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(f"{n} {have[n]} (expected {want[n]})" for n in set(want) & set(have) if have[n] != want[n])
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if items:
            shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise TinyLLMError(f"checkpoint in {model_dir} does not match its config: " + "; ".join(problems))


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def load_weights(model_dir: Path, cfg: ModelConfig, backend, progress: bool = True) -> tuple[ModelConfig, Weights]:
    """Open, check and upload every tensor; returns the config updated by detect_config."""
    tensors = open_checkpoint(model_dir)
    cfg = detect_config(cfg, tensors)
    validate(cfg, tensors, model_dir)
    native = tensors.native

    def get(name: str):
        f, key = tensors[name]
        a = f.tensor(key)
        if native and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = unpermute_native(a, cfg.n_heads if "q_proj" in name else cfg.n_kv_heads)
        bar.update(1)
        return backend.upload(name, a)

    total = len(expected_shapes(cfg))
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        embed = get("model.embed_tokens.weight")
        layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            lw = LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(p + "self_attn.q_proj.weight"), wk=get(p + "self_attn.k_proj.weight"),
                wv=get(p + "self_attn.v_proj.weight"), wo=get(p + "self_attn.o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
                w1=get(p + "mlp.gate_proj.weight"), w2=get(p + "mlp.down_proj.weight"),
                w3=get(p + "mlp.up_proj.weight"))
            if cfg.qkv_bias:
                lw.bq, lw.bk, lw.bv = (get(p + f"self_attn.{x}_proj.bias") for x in "qkv")
            layers.append(lw)
        norm = get("model.norm.weight")
        lm_head = embed if cfg.tie_embeddings else get("lm_head.weight")
    files = {id(f): f for f, _ in tensors.values()}
    nbytes = sum(os.path.getsize(f.path) for f in files.values())
    dtypes = {f.entries[k]["dtype"] for f, k in tensors.values()}
    return cfg, Weights(embed, layers, norm, lm_head, nbytes, dtypes)


def checkpoint_dtype(model_dir: Path) -> str:
    """'float32' | 'float16' | 'bfloat16': the dtype most of the checkpoint is stored in."""
    tensors = open_checkpoint(model_dir)
    counts: dict[str, int] = {}
    for f, k in tensors.values():
        dt = f.entries[k]["dtype"]
        counts[dt] = counts.get(dt, 0) + 1
    top = max(counts, key=counts.get) if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(top, "float32")
