"""Weights: the only module that knows weight file formats.

Reads safetensors (single file, or sharded through `model.safetensors.index.json` — never a
glob, since Mistral repos also hold `consolidated.safetensors`) by parsing the header and
memory-mapping the data: f32 / f16 / bf16 (bf16 through ml_dtypes, no torch). Maps HF and
Mistral-native names to one internal layout, undoes the native Q/K interleave, checks every
tensor's presence and shape, and hands each tensor to the backend, which casts it to its
compute dtype.

Weight-only quantization (quant.py's formats) enters here, in two ways:
* `quantization=FMT` quantizes a float checkpoint at load, one tensor at a time (quant.quantize
  works through a tensor's rows in chunks, so a 7B model is never held in float32): the
  projection matrices of every layer and an untied lm_head. The embedding table stays in the
  backend's float dtype (it is gathered a row per token, not streamed), as do norms and biases;
  a tied lm_head is the embedding table, so it stays float too. A matrix whose K is not a
  multiple of the format's block falls back (quant.fallback: q4_k -> q4_1, q6_k -> q8_0, as
  llama.cpp falls back for such rows) or stays float.
* A *quantized safetensors checkpoint* (what `tinyllm convert FILE.gguf` writes for GGUF
  Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensors) loads with no flag. Layout: weight `W` of format F is
  stored as one tensor per QuantTensor part, named `W.<part>` (`W.qs`, `W.d`, `W.m`, `W.dmin`,
  `W.scales`, `W.ql`, `W.qh`; dtypes U8 / I8 / F16, shapes as quant.py's table), and the file's
  `__metadata__` has the key `tinyllm.quantization` whose value is a JSON object
  {"W": {"format": F, "shape": [N, K]}, ...}. Example: a q4_0 `lm_head.weight` (49152, 576)
  is `lm_head.weight.qs` U8 (49152, 288) and `lm_head.weight.d` F16 (49152, 18).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from . import quant
from .config import ModelConfig
from .errors import TinyLLMError
from .jsonfile import JsonObject

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
# The dtypes of QuantTensor parts in a quantized checkpoint.
PART_DTYPES = {"U8": np.uint8, "I8": np.int8, "F16": np.float16}
QUANT_META_KEY = "tinyllm.quantization"

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
    attn_norm: object  # (dim,)
    wq: object  # (n_heads*head_dim, dim)
    wk: object  # (n_kv_heads*head_dim, dim)
    wv: object  # (n_kv_heads*head_dim, dim)
    wo: object  # (dim, n_heads*head_dim)
    ffn_norm: object  # (dim,)
    w1: object  # gate_proj (hidden_dim, dim)
    w2: object  # down_proj (dim, hidden_dim)
    w3: object  # up_proj   (hidden_dim, dim)
    bq: object = None  # (n_heads*head_dim,)   Qwen2 only
    bk: object = None  # (n_kv_heads*head_dim,)
    bv: object = None  # (n_kv_heads*head_dim,)
    # Fused on backends that fuse (cuda: one GEMV each at decode); wq/wk/wv, bq/bk/bv and
    # w1/w3 are then row views of these.
    wqkv: object = None  # rows [wq; wk; wv]
    bqkv: object = None  # [bq; bk; bv]
    w13: object = None  # rows [w1; w3]


@dataclass
class Weights:
    embed: object  # (vocab_size, dim)
    layers: list[LayerWeights]
    norm: object  # (dim,)
    lm_head: object  # (vocab_size, dim); the embedding table itself when tied
    nbytes_on_disk: int = 0
    dtypes: set = field(default_factory=set)
    # HF name -> quant format of every weight held quantized (the others are float)
    formats: dict = field(default_factory=dict)

    def named(self):
        """(HF tensor name, backend array) of every weight, in load order."""
        yield "model.embed_tokens.weight", self.embed
        for i, layer in enumerate(self.layers):
            for f in fields(layer):
                a = getattr(layer, f.name)
                if a is not None:
                    yield f"model.layers.{i}.{LAYER_HF_NAMES[f.name]}", a
        yield "model.norm.weight", self.norm
        if self.lm_head is not self.embed:
            yield "lm_head.weight", self.lm_head


# LayerWeights field -> HF name inside "model.layers.{i}."
LAYER_HF_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
}


# ---- safetensors ------------------------------------------------------------------------

# safetensors' own limits and element sizes (the Rust crate's MAX_HEADER_SIZE and Dtype::bitsize).
MAX_HEADER_BYTES = 100_000_000
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class SafetensorsFile:
    """Header + memmap of one .safetensors file; tensors are zero-copy numpy views.

    The header is checked with the safetensors library's rules before anything is mapped
    (check_header), then the library itself opens the file as a second opinion. Messages
    name the file and the tensor, never bytes of the file that did not parse as a header."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self.bad("it is shorter than the 8-byte header length; re-download it")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise self.bad(
                        f"its header length exceeds safetensors' {MAX_HEADER_BYTES // 10**6} MB "
                        "limit "
                        f"(not a safetensors file, or corrupt)"
                    )
                if 8 + n > size:
                    raise self.bad(
                        "its header runs past the end of the file (not a safetensors file, or "
                        "truncated)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise self.bad(f"cannot read it ({e.strerror or type(e).__name__})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise self.bad(
                "its header is not UTF-8 text (not a safetensors file, or corrupt)"
            ) from None
        except (ValueError, RecursionError):
            raise self.bad(
                "its header is not valid JSON (not a safetensors file, or corrupt)"
            ) from None
        self.data_start = 8 + n
        self.entries = check_header(self, header, size - self.data_start)
        self.quantized = _quant_meta(self, header.get("__metadata__") or {})
        self._library_check()
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def bad(self, what: str, tensor: str | None = None) -> TinyLLMError:
        where = f" (tensor {tensor})" if tensor is not None else ""
        return TinyLLMError(f"{self.path} is not a valid safetensors file{where}: {what}")

    def _library_check(self):
        """The safetensors library's parser, on a header check_header accepted: it must agree."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy"):
                pass
        except (
            Exception
        ) as e:  # SafetensorError; the header already parsed as ours, so its text is safe
            raise self.bad(
                f"the safetensors library rejects it ({str(e).splitlines()[0][:200]})"
            ) from None

    def tensor(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in ST_DTYPES:
            raise TinyLLMError(
                f"{self.path}: tensor {name} has dtype {e['dtype']}; supported: F32, F16, BF16"
            )
        a, b = e["data_offsets"]
        raw = self.mm[self.data_start + a : self.data_start + b]
        return raw.view(ST_DTYPES[e["dtype"]]).reshape(e["shape"])

    def quant_tensor(self, name: str) -> quant.QuantTensor:
        """The QuantTensor stored as `name.<part>` tensors (module doc), parts as memmap views."""
        fmt, shape = self.quantized[name]
        parts = {}
        for part, _, _ in quant.GGUF_FIELDS[fmt]:
            e = self.entries[f"{name}.{part}"]
            a, b = e["data_offsets"]
            raw = self.mm[self.data_start + a : self.data_start + b]
            parts[part] = raw.view(PART_DTYPES[e["dtype"]]).reshape(e["shape"])
        return quant.QuantTensor(fmt, shape, parts)


def _quant_meta(f: SafetensorsFile, meta: dict) -> dict:
    """`tinyllm.quantization` metadata -> {name: (format, (N, K))}, each checked against the
    part tensors the header holds (names, dtypes and shapes quant.py's layout implies)."""
    text = meta.get(QUANT_META_KEY)
    if text is None:
        return {}
    try:
        table = json.loads(text)
    except (ValueError, RecursionError):
        raise f.bad(f"__metadata__ {QUANT_META_KEY} is not valid JSON") from None
    if not isinstance(table, dict):
        raise f.bad(f"__metadata__ {QUANT_META_KEY} must be a JSON object")
    out = {}
    for name, spec in table.items():
        fmt = spec.get("format") if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if fmt not in quant.FORMATS or not (
            isinstance(shape, list) and len(shape) == 2 and all(_is_uint(v) for v in shape)
        ):
            raise f.bad(
                f"{QUANT_META_KEY}: expected {{format: one of {', '.join(quant.FORMATS)}, "
                f"shape: [N, K]}}",
                name,
            )
        n, k = shape
        if k % quant.BLOCK[fmt]:
            raise f.bad(f"{fmt} needs K a multiple of {quant.BLOCK[fmt]}, not {k}", name)
        for part, dt, per_block in quant.GGUF_FIELDS[fmt]:
            e = f.entries.get(f"{name}.{part}")
            want = [n, k // quant.BLOCK[fmt] * per_block]
            dtype = {np.uint8: "U8", np.int8: "I8", np.float16: "F16"}[dt]
            if e is None or e["dtype"] != dtype or list(e["shape"]) != want:
                raise f.bad(f"{fmt} needs a {dtype} tensor {name}.{part} of shape {want}", name)
        out[name] = (fmt, (n, k))
    return out


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_header(f: SafetensorsFile, header, data_len: int) -> dict:
    """The safetensors header rules (as the safetensors crate's Metadata::validate): a JSON
    object of tensors, each {dtype: known name, shape: [uint...], data_offsets: [begin, end]}
    with begin <= end and end - begin == prod(shape) * dtype bits / 8; sorted by offset the
    tensors tile the data exactly (no gap, no overlap, nothing after the last); an optional
    "__metadata__" object of strings. Returns the tensor entries."""
    if not isinstance(header, dict):
        raise f.bad(
            f"its header is a JSON {type(header).__name__ if header is not None else 'null'}, "
            f"not an object of tensors"
        )
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise f.bad("__metadata__ must be an object of strings")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, e in entries.items():
        if not isinstance(e, dict):
            raise f.bad("its entry is not an object", name)
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise f.bad(f"dtype must be one of {', '.join(DTYPE_BITS)}", name)
        if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
            raise f.bad("shape must be a list of integers >= 0", name)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise f.bad("data_offsets must be [begin, end], integers >= 0", name)
        if offs[1] < offs[0]:
            raise f.bad(f"data_offsets {offs} end before they begin", name)
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offs[1] - offs[0]:
            raise f.bad(
                f"shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets {offs} "
                f"hold {offs[1] - offs[0]}",
                name,
            )
    end = 0
    for name, e in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, stop = e["data_offsets"]
        if begin != end:
            what = (
                "overlaps the tensor before it"
                if begin < end
                else "leaves a gap after the tensor before it"
            )
            raise f.bad(
                f"data_offsets {e['data_offsets']} {what} (safetensors tensors tile the data "
                "exactly)",
                name,
            )
        end = stop
    if end > data_len:
        raise TinyLLMError(
            f"{f.path} is truncated: its tensors need {f.data_start + end:,} bytes, "
            f"the file has {f.data_start + data_len:,}; re-download it"
        )
    if end < data_len:
        raise f.bad(f"{data_len - end:,} bytes follow the last tensor (the data must end with it)")
    return entries


class TensorIndex(dict):
    """HF tensor name -> (file, name in that file), or for a quantized weight (file,
    QUANTIZED) with its parts read by file.quant_tensor(name). `native` is True when the names
    were mapped from Mistral's consolidated.safetensors (whose wq/wk rows are interleaved)."""

    native: bool = False

    def shape(self, name: str) -> tuple:
        f, key = self[name]
        return f.quantized[name][1] if key is QUANTIZED else tuple(f.entries[key]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype, or the quant format ("q4_k") of a quantized weight."""
        f, key = self[name]
        return f.quantized[name][0] if key is QUANTIZED else f.entries[key]["dtype"]

    def formats(self) -> dict:
        """HF name -> quant format of the weights stored quantized."""
        return {n: f.quantized[n][0] for n, (f, key) in self.items() if key is QUANTIZED}


QUANTIZED = "<quantized>"  # TensorIndex value of a quantized weight


def _index(pairs) -> TensorIndex:
    """TensorIndex over (name, file) pairs: the parts of a quantized weight become one entry."""
    index = TensorIndex()
    for name, f in pairs:
        base, _, part = name.rpartition(".")
        if base in f.quantized:
            index[base] = (f, QUANTIZED)
        else:
            index[name] = (f, name)
    return index


def shard_path(model_dir: Path, index: Path, name) -> Path:
    """A shard named in the index, as a path inside model_dir: a relative name without '..'
    (a symlinked file is fine: the Hugging Face cache links every file into its blobs)."""
    p = PurePosixPath(name) if isinstance(name, str) else None
    if (
        p is None
        or not name
        or "\\" in name
        or "\0" in name
        or p.is_absolute()
        or PureWindowsPath(name).drive
        or ".." in p.parts
        or not name.endswith(".safetensors")
    ):
        shown = json.dumps(name)[:80] if isinstance(name, str) else type(name).__name__
        raise TinyLLMError(
            f"{index}: shard {shown} is not allowed: shards must be .safetensors files named "
            f"relative to the model directory, without '..'"
        )
    return model_dir / p


def open_checkpoint(model_dir: Path) -> TensorIndex:
    """HF: model.safetensors.index.json or model.safetensors; Mistral native:
    consolidated.safetensors (names mapped to HF, `native` set)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wmap = JsonObject.read(index, "safetensors index").get("weight_map")
        if not (isinstance(wmap, dict) and wmap and all(isinstance(v, str) for v in wmap.values())):
            raise TinyLLMError(
                f"{index}: weight_map must be a non-empty object of tensor name -> shard file"
            )
        files = {}
        for fname in sorted(set(wmap.values())):
            p = shard_path(model_dir, index, fname)
            if not p.is_file():
                raise TinyLLMError(
                    f"{p} is named in {index.name} but missing; re-download the model"
                )
            files[fname] = SafetensorsFile(p)
        for name, fname in wmap.items():
            if name not in files[fname].entries:
                raise TinyLLMError(
                    f"{index.name} puts tensor {name} in {fname}, which does not hold it; "
                    f"re-download the model"
                )
        return _index((name, files[f]) for name, f in wmap.items())
    single = model_dir / "model.safetensors"
    if single.is_file():
        f = SafetensorsFile(single)
        return _index((name, f) for name in f.entries)
    native = model_dir / "consolidated.safetensors"
    if native.is_file() and (model_dir / "params.json").is_file():
        f = SafetensorsFile(native)
        index = TensorIndex({_native_to_hf(name): (f, name) for name in f.entries})
        index.native = True
        return index
    raise TinyLLMError(
        f"{model_dir} has no model.safetensors, model.safetensors.index.json or "
        "consolidated.safetensors; .bin/.pth checkpoints are not supported (convert to "
        "safetensors)"
    )


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


# ---- writing ------------------------------------------------------------------------------

_ST_NAME = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
}


def quant_specs(name: str, fmt: str, shape) -> list[tuple[str, str, tuple]]:
    """(tensor name, safetensors dtype, shape) of the parts a quantized weight is stored as."""
    n, k = shape
    return [
        (f"{name}.{part}", _ST_NAME[np.dtype(dt)], (n, k // quant.BLOCK[fmt] * per_block))
        for part, dt, per_block in quant.GGUF_FIELDS[fmt]
    ]


def quant_metadata(formats: dict) -> dict:
    """The `__metadata__` entry naming the quantized weights: {name: (fmt, (N, K))}."""
    table = {n: {"format": f, "shape": list(s)} for n, (f, s) in formats.items()}
    return {QUANT_META_KEY: json.dumps(table, separators=(",", ":"))}


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (every name, dtype and shape,
    known in advance) first, then each tensor's bytes in the same order, so peak memory is
    one tensor. A quantized weight is written with write_quant (its parts, module doc)."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple]], metadata: dict):
        header: dict = {"__metadata__": dict(metadata)}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * DTYPE_BITS[dtype] // 8
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self.specs, self.next = specs, 0
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

    def write(self, name: str, a: np.ndarray) -> None:
        want, dtype, shape = self.specs[self.next]
        a = np.ascontiguousarray(a)  # (BF16 may travel as its uint16 bits)
        if (name, a.dtype.itemsize * 8, tuple(a.shape)) != (want, DTYPE_BITS[dtype], tuple(shape)):
            raise ValueError(f"expected {want} {dtype} {shape}, got {name} {a.dtype} {a.shape}")
        self.f.write(a.view(np.uint8).data)  # (bytes: bf16 has no buffer format)
        self.next += 1

    def write_quant(self, name: str, qt: quant.QuantTensor) -> None:
        for part, _, _ in quant.GGUF_FIELDS[qt.fmt]:
            self.write(f"{name}.{part}", qt.parts[part])

    def close(self) -> None:
        self.f.close()
        if self.next != len(self.specs):
            raise ValueError(f"{len(self.specs) - self.next} tensors were not written")


# ---- expected tensors --------------------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv, h = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (h, d),
                p + "mlp.up_proj.weight": (h, d),
                p + "mlp.down_proj.weight": (d, h),
            }
        )
        if cfg.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
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
    have = {n: tensors.shape(n) for n in tensors if not IGNORED.search(n)}
    if cfg.tie_embeddings:
        have.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(
        f"{n} {have[n]} (expected {want[n]})" for n in set(want) & set(have) if have[n] != want[n]
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if items:
            shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise TinyLLMError(
            f"checkpoint in {model_dir} does not match its config: " + "; ".join(problems)
        )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def quantizable(name: str) -> bool:
    """The weights `quantization=` quantizes: every layer's projection matrices and lm_head
    (the embedding table, norms and biases stay float; module doc)."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def planned_formats(cfg: ModelConfig, quantization: str | None, stored: dict) -> dict:
    """HF name -> quant format of every weight the loader will hold quantized: those stored
    quantized, and with `quantization` the float projection matrices (quant.fallback where K
    does not divide into the format's blocks)."""
    formats = dict(stored)
    if quantization:
        for name, shape in expected_shapes(cfg).items():
            if name not in formats and quantizable(name) and len(shape) == 2:
                fmt = quant.fallback(quantization, shape[1])
                if fmt is not None:
                    formats[name] = fmt
    return formats


def check_backend_formats(backend, formats: dict) -> None:
    """Refuse, before anything is uploaded, formats the backend's linear cannot run."""
    have = getattr(backend, "quant_formats", ())  # (a backend without the capability: none)
    missing = sorted(set(formats.values()) - set(have))
    if missing:
        raise TinyLLMError(
            f"the {backend.name} backend does not run {', '.join(missing)} weights yet; "
            f"use --backend numpy"
        )


def load_weights(
    model_dir: Path,
    cfg: ModelConfig,
    backend,
    progress: bool = True,
    quantization: str | None = None,
) -> tuple[ModelConfig, Weights]:
    """Open, check and upload every tensor; returns the config updated by detect_config.
    With `quantization` (a quant.py format) the float projection matrices are quantized on
    the way, one tensor at a time; weights stored quantized load as they are."""
    tensors = open_checkpoint(model_dir)
    cfg = detect_config(cfg, tensors)
    validate(cfg, tensors, model_dir)
    native = tensors.native
    formats = planned_formats(cfg, quantization, tensors.formats())
    check_backend_formats(backend, formats)

    def get(name: str):
        f, key = tensors[name]
        bar.update(1)
        if key is QUANTIZED:
            return backend.upload_quant(name, f.quant_tensor(name))
        a = f.tensor(key)
        if native and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = unpermute_native(a, cfg.n_heads if "q_proj" in name else cfg.n_kv_heads)
        if name in formats:
            return backend.upload_quant(name, quant.quantize(a, formats[name], quantization))
        return backend.upload(name, a)

    total = len(expected_shapes(cfg))
    with tqdm(
        total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False
    ) as bar:
        embed = get("model.embed_tokens.weight")
        layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            lw = LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(p + "self_attn.q_proj.weight"),
                wk=get(p + "self_attn.k_proj.weight"),
                wv=get(p + "self_attn.v_proj.weight"),
                wo=get(p + "self_attn.o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
                w1=get(p + "mlp.gate_proj.weight"),
                w2=get(p + "mlp.down_proj.weight"),
                w3=get(p + "mlp.up_proj.weight"),
            )
            if cfg.qkv_bias:
                lw.bq, lw.bk, lw.bv = (get(p + f"self_attn.{x}_proj.bias") for x in "qkv")
            layers.append(lw)
        norm = get("model.norm.weight")
        lm_head = embed if cfg.tie_embeddings else get("lm_head.weight")
    files = {id(f): f for f, _ in tensors.values()}
    nbytes = sum(os.path.getsize(f.path) for f in files.values())
    dtypes = {tensors.dtype(n) for n in tensors}
    if cfg.tie_embeddings:
        formats.pop("lm_head.weight", None)
    return cfg, Weights(embed, layers, norm, lm_head, nbytes, dtypes, formats)


def checkpoint_dtype(model_dir: Path) -> str:
    """'float32' | 'float16' | 'bfloat16': the dtype most of the checkpoint is stored in."""
    tensors = open_checkpoint(model_dir)
    counts: dict[str, int] = {}
    for name in tensors:
        dt = tensors.dtype(name)
        if dt in ST_DTYPES:  # (quantized weights say nothing about the float dtype)
            counts[dt] = counts.get(dt, 0) + 1
    top = max(counts, key=counts.get) if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(top, "float32")
