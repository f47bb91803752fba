"""GGUF -> Hugging Face directory conversion (`tinyllm convert FILE OUT`).

Owns reading llama.cpp's GGUF files (through the `gguf` package's GGUFReader and
dequantizers) and writing what tinyllm loads everywhere else: `config.json`,
`model.safetensors` (HF tensor names, rotate-half q/k rows), `tokenizer.json`,
`tokenizer_config.json`, `generation_config.json`. It does not load models or run them;
`weights.py` still is the only reader of safetensors at run time.

Output dtypes (the `dtype=None` default): F32/F16/BF16 tensors keep their dtype (BF16 bits
are copied, not rounded); every quantized tensor is dequantized to float32, because the
dequantized values d*q (+m) are exact in float32 and would be rounded again in 16 bits.
Pass dtype="bfloat16"/"float16"/"float32" to force one dtype (halves a 7B file).

keep_quantized=True (what `tinyllm convert` does unless --dtype is given): projection matrices
and an untied lm_head of types Q8_0/Q4_0/Q4_1/Q4_K/Q6_K are written in weights.py's quantized
safetensors layout, their blocks repacked bit for bit (quant.from_gguf_blocks; q/k rows
un-permuted whole, which never splits a block); Q5_0 matrices (the fallback of llama.cpp's
Q4_K_M recipe for rows that do not divide into 256) become q8_0 blocks holding the very same
values (q5_0_as_q8_0), so a Q4_K_M file loses nothing; matrices of other quantized types (Q5_1,
Q5_K, Q3_K, IQ4_NL, ...) are dequantized and requantized to the nearest supported format at or
above their bits (REQUANTIZE; `requantize=FMT` picks another), and the error this adds is
measured per source type (relative RMS over the tensors; 0 for Q5_0 -> q8_0) and recorded in
tinyllm_convert.json. The embedding
table is always written float (the loader keeps it float: it is gathered, not streamed).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TinyLLMError

# GGUF general.architecture -> the HF class we write. llama.cpp converts Mistral-7B to the
# "llama" architecture; we recognise it by name (as transformers' GGUF loader does).
SUPPORTED_GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# Everything gguf.quants can dequantize that tinyllm tests (tests/test_gguf.py): the legacy
# block formats, the K-quants that make up the usual Q*_K_M files, and the IQ4 formats.
QUANT_TYPES = (
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
)
# Supported GGUF types kept as they are, and where the others go when kept quantized.
KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}
REQUANTIZE = {
    "Q5_0": "q8_0",  # exact: q5_0_as_q8_0
    "Q5_1": "q6_k",
    "Q5_K": "q6_k",
    "Q2_K": "q4_k",
    "Q3_K": "q4_k",
    "IQ4_NL": "q4_k",
    "IQ4_XS": "q4_k",
}
OUT_DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),
}

# Bumped when the output of a conversion changes, so cached conversions are redone (hub.py).
CONVERTER_VERSION = 1
PROVENANCE_FILE = "tinyllm_convert.json"

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as the original HF tokenizer.json files of these families spell them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (how to pre-tokenize, regex). "gpt2": ByteLevel's built-in GPT-2
# regex; "digits": each digit alone, then the GPT-2 regex (SmolLM/StarCoder tokenizers);
# "split": a Split on the family's regex, then ByteLevel without its own regex.
GPT2_PRE_TOKENIZERS = {
    "default": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "gpt-2": ("gpt2", None),
    "smollm": ("digits", None),
    "starcoder": ("digits", None),
    "refact": ("digits", None),
    "codeshell": ("digits", None),
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "llama3": ("split", _LLAMA3_SPLIT),
    "llama-v3": ("split", _LLAMA3_SPLIT),
    "smaug-bpe": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
    "deepseek-r1-qwen": ("split", _QWEN2_SPLIT),
    "tekken": ("split", _TEKKEN_SPLIT),
}
# llama.cpp turns ignore_merges on for the Llama-3 family (a pre-token that is already a
# vocabulary entry is taken whole); HF's Llama-3 tokenizer.json does the same.
_IGNORE_MERGES_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}
_NFC_PRE = {"qwen2", "deepseek-r1-qwen"}  # Qwen2's tokenizer.json normalizes to NFC
# End-of-generation tokens llama.cpp stops on by their text even when no id key names them.
_EOG_TEXTS = {
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",  # w1
    "ffn_up.weight": "mlp.up_proj.weight",  # w3
    "ffn_down.weight": "mlp.down_proj.weight",  # w2
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors we
    drop."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if _IGNORED.match(gguf_name):
        return None
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise TinyLLMError(
        f"unexpected tensor {gguf_name!r} in the GGUF file: only dense "
        f"{', '.join(SUPPORTED_GGUF_ARCHS)} models are supported"
    )


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf `permute`).

    llama.cpp rotates adjacent pairs (2j, 2j+1), HF rotates halves (j, j + d/2), so the
    converter moved HF row (head, half, j) to row (head, j, half). Viewing the rows as
    (n_heads, d/2, 2) and swapping the last two axes puts them back. Works on 1-D biases too.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- reading the GGUF ------------------------------------------------------------------


class _Meta:
    """Key/value metadata with defaults; values decoded by gguf's ReaderField.contents()."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def __contains__(self, key: str) -> bool:
        return key in self.fields


def _open(gguf_path: Path):
    try:
        import gguf
    except ImportError:
        raise TinyLLMError(
            "reading GGUF files needs the gguf package: pip install 'tinyllm[demo]'"
        ) from None
    if not gguf_path.is_file():
        raise TinyLLMError(f"{gguf_path} does not exist (expected a .gguf file)")
    try:
        return gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError, struct.error) as e:
        raise TinyLLMError(f"{gguf_path} is not a readable GGUF file ({e})") from None


@dataclass
class _Tensor:
    gguf_name: str
    hf_name: str
    qtype: str  # GGML type name, e.g. "Q4_K"
    shape: tuple  # HF (row-major) shape
    out: str  # safetensors dtype: F32 | F16 | BF16
    reader_tensor: object
    permute_heads: int = 0  # >0: un-permute rows with this many heads
    fmt: str | None = None  # written quantized in this quant.py format
    requantized: bool = False  # fmt is not the GGUF's own type: dequantized, then quantized

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.out == "F32" else 2)


def _plan_tensors(
    reader,
    arch: str,
    n_heads: int,
    n_kv_heads: int,
    dtype: str | None,
    keep_quantized: bool = False,
    requantize: str | None = None,
) -> list[_Tensor]:
    from . import quant
    from .weights import quantizable

    supported = set(FLOAT_TYPES) | set(QUANT_TYPES)
    plan = []
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        qtype = t.tensor_type.name
        if qtype not in supported:
            raise TinyLLMError(
                f"tensor {t.name} has GGUF type {qtype}, which tinyllm cannot convert; supported: "
                f"{', '.join(FLOAT_TYPES + QUANT_TYPES)} (re-quantize the model, e.g. to Q4_K_M or "
                "Q8_0)"
            )
        if dtype is not None:
            out = OUT_DTYPES[dtype][0]
        else:
            out = qtype if qtype in FLOAT_TYPES else "F32"
        heads = 0
        if arch != "qwen2":  # Qwen2 GGUFs keep HF's rotate-half layout (NEOX rope in llama.cpp)
            heads = n_heads if ".attn_q." in t.name else n_kv_heads if ".attn_k." in t.name else 0
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        fmt, again = None, False
        if keep_quantized and qtype not in FLOAT_TYPES and quantizable(name) and len(shape) == 2:
            # the GGUF's own format when supported, else `requantize` or the nearest one
            again = qtype not in KEPT
            fmt = quant.fallback(KEPT.get(qtype) or requantize or REQUANTIZE[qtype], shape[1])
        plan.append(_Tensor(t.name, name, qtype, shape, out, t, heads, fmt, again and bool(fmt)))
    return plan


def _tensor_quant(t: _Tensor, losses: dict):
    """The tensor as a QuantTensor in HF row order: the GGUF's own blocks repacked, or (for
    other types) dequantized and requantized, its squared error and norm added to losses."""
    import gguf

    from . import quant

    rt = t.reader_tensor
    if not t.requantized:
        qt = quant.from_gguf_blocks(t.fmt, np.asarray(rt.data), t.shape)
    else:
        a = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(t.shape)
        if t.qtype == "Q5_0" and t.fmt == "q8_0":
            qt = q5_0_as_q8_0(np.asarray(rt.data), a)
        else:
            qt = quant.quantize(a, t.fmt)
        err = quant.dequantize(qt) - a
        key = f"{t.qtype} -> {t.fmt}"
        e2, n2, count = losses.get(key, (0.0, 0.0, 0))
        losses[key] = (
            e2 + float(np.square(err, dtype=np.float64).sum()),
            n2 + float(np.square(a, dtype=np.float64).sum()),
            count + 1,
        )
    if t.permute_heads:  # rows are independent in every block format: permute them whole
        qt = quant.QuantTensor(
            qt.fmt, qt.shape, {k: unpermute_rows(p, t.permute_heads) for k, p in qt.parts.items()}
        )
    return qt


def q5_0_as_q8_0(raw: np.ndarray, values: np.ndarray):
    """Q5_0 blocks -> q8_0 blocks of the same values, exactly.

    A Q5_0 block (ggml-common.h's block_q5_0, 22 bytes) is an fp16 scale d, then the 32 five-bit
    codes q (low nibbles in qs, fifth bits in qh); its values are d * (q - 16). A q8_0 block is
    an fp16 scale and 32 int8 codes: keep d, and the codes q - 16 in [-16, 15] fit int8, so the
    values are the same floats (d * k with |k| <= 16 is exact in float32; the division back
    is exact too: with finite scales, and others are refused, the measured loss is 0).
    Costs 8.5 instead of 5.5 bits per weight for those matrices.
    raw: the tensor's blocks (uint8, N rows of K/32 blocks); values: gguf's dequantization
    of them, (N, K) float32."""
    from . import quant

    n, k = values.shape
    d = np.ascontiguousarray(raw.reshape(n, k // 32, 22)[:, :, :2]).view(np.float16)[..., 0]
    if not np.isfinite(d).all():
        raise TinyLLMError(
            "a Q5_0 tensor has scales that are not finite; re-quantize the model from its source"
        )
    df = np.repeat(d.astype(np.float32), 32, axis=1)
    codes = np.divide(values, df, out=np.zeros_like(values), where=df != 0)
    return quant.QuantTensor("q8_0", (n, k), {"d": d, "qs": np.rint(codes).astype(np.int8)})


def _tensor_values(t: _Tensor) -> np.ndarray:
    """The tensor in HF layout and its output dtype (bf16 travels as uint16 bits)."""
    import gguf

    rt = t.reader_tensor
    if t.qtype == "BF16":
        a = np.ascontiguousarray(rt.data).view(np.uint16).reshape(t.shape)
    elif t.qtype in ("F32", "F16"):
        a = np.asarray(rt.data).reshape(t.shape)
    else:
        a = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(t.shape)
    if t.permute_heads:
        a = unpermute_rows(a, t.permute_heads)
    return _cast(a, t.qtype, t.out)


def _cast(a: np.ndarray, src: str, out: str) -> np.ndarray:
    if out == "BF16":
        if src == "BF16":
            return a
        import ml_dtypes  # round to nearest even, like torch's .to(bfloat16)

        return a.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    if src == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32 if out == "F32" else np.float16, copy=False)


def _write_safetensors(path: Path, plan: list[_Tensor], progress: bool) -> dict:
    """safetensors = u64 header length + JSON header + raw row-major bytes. Written one
    tensor at a time (weights.SafetensorsWriter), so peak memory is one dequantized tensor,
    not the model. Quantized tensors go in weights.py's layout. Returns the requantization
    losses: {"Q5_0 -> q8_0": {"tensors": n, "rel_rms_error": e}}."""
    from tqdm.auto import tqdm

    from .weights import SafetensorsWriter, quant_metadata, quant_specs

    specs, held = [], {}
    for t in plan:
        if t.fmt:
            specs += quant_specs(t.hf_name, t.fmt, t.shape)
            held[t.hf_name] = (t.fmt, t.shape)
        else:
            specs.append((t.hf_name, t.out, t.shape))
    meta = {"format": "pt", "source": "gguf", **(quant_metadata(held) if held else {})}
    losses: dict = {}
    writer = SafetensorsWriter(path, specs, meta)
    try:
        with tqdm(
            total=len(plan), unit="tensor", desc="Converting GGUF", disable=not progress
        ) as bar:
            for t in plan:
                if t.fmt:
                    writer.write_quant(t.hf_name, _tensor_quant(t, losses))
                else:
                    writer.write(t.hf_name, _tensor_values(t))
                bar.update(1)
    finally:
        writer.close()
    return {
        k: {"tensors": c, "rel_rms_error": math.sqrt(e2 / n2) if n2 else 0.0}
        for k, (e2, n2, c) in losses.items()
    }


# ---- config ----------------------------------------------------------------------------


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores one divisor per frequency instead of the four parameters: 1 for short
    wavelengths, `factor` for long ones, 1/((1-s)/factor + s) in between. We try the values
    Meta's releases use and keep the set that reproduces every divisor.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    factor = float(round(float(factors.max()), 4))
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 4.0):
            for high in (4.0, 2.0, 8.0, 16.0, 32.0):
                if high <= low:
                    continue
                smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
                want = np.where(
                    wavelen < old_ctx / high,
                    1.0,
                    np.where(
                        wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)
                    ),
                )
                if np.allclose(want, factors, rtol=1e-4, atol=1e-6):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": old_ctx,
                    }
    raise TinyLLMError(
        "cannot recover the llama3 RoPE scaling from the GGUF's rope_freqs tensor "
        "(unusual parameters); convert the original HF checkpoint instead"
    )


def _hf_architecture(meta: _Meta) -> tuple[str, str]:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise TinyLLMError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHS)} "
            "(Llama 2/3, Mistral, Qwen2/2.5, SmolLM2, TinyLlama, ...)"
        )
    hf = SUPPORTED_GGUF_ARCHS[arch]
    names = " ".join(str(meta.get(k) or "") for k in ("general.name", "general.basename")).lower()
    if arch == "llama" and "mistral" in names:
        hf = "MistralForCausalLM"
    return arch, hf


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not
    9.99999974e-06)."""
    return float(str(np.float32(x)))


def _single_int(value, what: str) -> int:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise TinyLLMError(f"per-layer {what} ({sorted(set(value))}) is not supported")
        value = value[0]
    return int(value)


def _build_config(meta: _Meta, reader, arch: str, hf_arch: str) -> dict:
    tensors = {t.name: t for t in reader.tensors}

    def rows(name: str) -> int | None:
        t = tensors.get(name)
        return int(t.shape[-1]) if t is not None and len(t.shape) == 2 else None

    def key(k, default=None):
        return meta.get(f"{arch}.{k}", default)

    n_layers = int(key("block_count"))
    dim = int(key("embedding_length"))
    n_heads = _single_int(key("attention.head_count"), "head counts")
    n_kv = _single_int(key("attention.head_count_kv", n_heads), "KV head counts")
    q_rows = rows("blk.0.attn_q.weight")
    head_dim = q_rows // n_heads if q_rows else int(key("attention.key_length", dim // n_heads))
    rope_dim = key("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise TinyLLMError(
            f"partial rotary embeddings (rope dim {rope_dim} < head_dim {head_dim}) are not "
            "supported"
        )
    vocab = rows("token_embd.weight") or int(
        key("vocab_size") or len(meta.get("tokenizer.ggml.tokens"))
    )
    theta = _f32(key("rope.freq_base", 10000.0))
    scaling = _rope_scaling(key, tensors, theta, head_dim)

    ids = _special_ids(meta)
    eos = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    eos = list(dict.fromkeys(eos))
    has_bias = "blk.0.attn_q.bias" in tensors
    cfg = {
        "architectures": [hf_arch],
        "model_type": {
            "LlamaForCausalLM": "llama",
            "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2",
        }[hf_arch],
        "hidden_size": dim,
        "intermediate_size": rows("blk.0.ffn_gate.weight") or int(key("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(
            key("attention.layer_norm_rms_epsilon", 1e-6 if arch == "qwen2" else 1e-5)
        ),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": ids["bos"],
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if ids["pad"] is not None:
        cfg["pad_token_id"] = ids["pad"]
    if hf_arch == "Qwen2ForCausalLM":
        cfg.update(use_sliding_window=False, sliding_window=None)  # q/k/v biases are implied
    else:
        cfg.update(attention_bias=has_bias, mlp_bias=False)
        if hf_arch == "MistralForCausalLM":
            window = key("attention.sliding_window")
            cfg["sliding_window"] = int(window) if window else None
    types = {t.tensor_type.name for t in reader.tensors if hf_tensor_name(t.name)}
    emb = tensors.get("token_embd.weight")
    cfg["torch_dtype"] = "float32"
    if not types - set(FLOAT_TYPES) and emb is not None:
        cfg["torch_dtype"] = {"F16": "float16", "BF16": "bfloat16"}.get(
            emb.tensor_type.name, "float32"
        )
    return cfg


def _rope_scaling(key, tensors: dict, theta: float, head_dim: int) -> dict | None:
    """HF's rope_scaling: linear from the metadata, llama3 from a rope_freqs tensor, or None."""
    scaling = None
    stype = key("rope.scaling.type")
    if stype not in (None, "none", ""):
        if stype != "linear":
            raise TinyLLMError(
                f"unsupported RoPE scaling {stype!r} in the GGUF; supported: linear, llama3"
            )
        scaling = {"rope_type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensors:
        import gguf

        t = tensors["rope_freqs.weight"]
        scaling = _llama3_rope_scaling(
            gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64),
            theta,
            head_dim,
        )
    return scaling


def _special_ids(meta: _Meta) -> dict:
    names = {
        "bos": "bos_token_id",
        "eos": "eos_token_id",
        "eot": "eot_token_id",
        "eom": "eom_token_id",
        "unk": "unknown_token_id",
        "pad": "padding_token_id",
    }
    return {
        k: (
            None
            if meta.get(f"tokenizer.ggml.{v}") is None
            else int(meta.get(f"tokenizer.ggml.{v}"))
        )
        for k, v in names.items()
    }


# ---- tokenizer -------------------------------------------------------------------------


def spm_merges(
    tokens: list[str], scores: list[float], types: list[int] | None
) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary (GGUFs from tokenizer.model carry none).

    SentencePiece merges the adjacent pair whose concatenation is the best-scoring vocabulary
    piece. As ranked BPE merges: every split (left, right) of each normal piece, both halves
    in the vocabulary, ordered by the piece's score (best first), then longer left halves.
    Control/byte/unused pieces are never produced by merging text, so they are not targets.
    """
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    cands = []
    for i, piece in enumerate(tokens):
        if types is not None and types[i] != NORMAL or vocab[piece] != i:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                cands.append(
                    (
                        -float(scores[i]),
                        -len(left),
                        -len(right),
                        i,
                        vocab[left],
                        vocab[right],
                        left,
                        right,
                    )
                )
    cands.sort()
    return [(c[6], c[7]) for c in cands]


def build_tokenizer(meta: _Meta):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary, plus the add_bos flag."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TinyLLMError("the GGUF file carries no vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type")
    ids = _special_ids(meta)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = meta.get("tokenizer.ggml.merges")

    if kind == "gpt2":
        tok, base_post, default_bos, special_types = _byte_level_bpe(meta, vocab, merges)
    elif kind == "llama":
        tok, base_post, default_bos, special_types = _sentencepiece_bpe(
            meta, tokens, types, vocab, merges, ids
        )
    else:
        raise TinyLLMError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 (byte-level BPE), "
            "llama (SentencePiece BPE)"
        )
    if types is not None:
        _add_whole_tokens(tok, tokens, types, special_types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and ids["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    _set_post_processor(tok, tokens, vocab, ids, add_bos, add_eos, base_post)
    return tok, add_bos, add_eos


def _byte_level_bpe(meta: _Meta, vocab: dict[str, int], merges):
    """tokenizer.ggml.model "gpt2": byte-level BPE with the pre-tokenizer its `pre` names.
    Returns (tokenizer, base post-processor, default add_bos, token types that are special)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in GPT2_PRE_TOKENIZERS:
        raise TinyLLMError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(GPT2_PRE_TOKENIZERS)}"
        )
    if merges is None:
        raise TinyLLMError(
            "the GGUF's byte-level BPE vocabulary has no merges (tokenizer.ggml.merges)"
        )
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _IGNORE_MERGES_PRE,
        )
    )
    how, regex = GPT2_PRE_TOKENIZERS[pre]
    if how == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif how == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _NFC_PRE:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok, processors.ByteLevel(trim_offsets=False), pre in _IGNORE_MERGES_PRE, (CONTROL,)


def _sentencepiece_bpe(meta: _Meta, tokens, types, vocab: dict[str, int], merges, ids: dict):
    """tokenizer.ggml.model "llama": SentencePiece BPE (merges, or rebuilt from the scores)
    with byte fallback. Returns (tokenizer, base post-processor, default add_bos, token
    types that are special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    add_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    scores = meta.get("tokenizer.ggml.scores")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None:
        pairs = spm_merges(tokens, scores, types)
    else:
        raise TinyLLMError("the GGUF's SentencePiece vocabulary has neither merges nor scores")
    unk = tokens[ids["unk"]] if ids["unk"] is not None else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # "first": only the start of the text gets "▁" (HF's non-legacy Llama/Mistral tokenizers)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # llama.cpp adds BOS to SentencePiece vocabularies unless told not to
    return tok, None, True, (CONTROL, UNKNOWN)


def _add_whole_tokens(tok, tokens, types, special_types):
    """Control tokens (<|im_start|>, <s>, [INST]) are matched whole and are special;
    user-defined ones are matched whole but decoded like text."""
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in special_types
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == USER_DEFINED
        ]
    )


def _set_post_processor(tok, tokens, vocab, ids: dict, add_bos: bool, add_eos: bool, base_post):
    """BOS/EOS added around each text as the GGUF asks, after the base post-processor."""
    from tokenizers import processors

    if add_bos or add_eos:
        bos, eos = tokens[ids["bos"]] if add_bos else None, tokens[ids["eos"]] if add_eos else None
        single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
        pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
        specials = [(t, vocab[t]) for t in (bos, eos) if t]
        template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        tok.post_processor = processors.Sequence([base_post, template]) if base_post else template
    elif base_post is not None:
        tok.post_processor = base_post


def _tokenizer_config(meta: _Meta, add_bos: bool, add_eos: bool, ctx: int) -> dict:
    tokens = meta.get("tokenizer.ggml.tokens")
    ids = _special_ids(meta)

    def text(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(ids["bos"]),
        "eos_token": text(ids["eos"]),
        "unk_token": text(ids["unk"]),
        "pad_token": text(ids["pad"]),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": ctx,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def _generation_config(meta: _Meta, config: dict) -> dict:
    """bos/eos ids (every end-of-generation token the vocabulary has) and, when the GGUF
    records the author's sampling defaults (general.sampling.*), those."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [CONTROL] * len(tokens)
    eos = config["eos_token_id"]
    eos = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    eos += [
        i
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == CONTROL and t in _EOG_TEXTS and i not in eos
    ]
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if config.get("pad_token_id") is not None:
        gen["pad_token_id"] = config["pad_token_id"]
    for key, hf in (
        ("temp", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("penalty_repeat", "repetition_penalty"),
    ):
        v = meta.get(f"general.sampling.{key}")
        if v is not None:
            gen[hf] = int(v) if hf == "top_k" else _f32(v)
    if "temperature" in gen:
        gen["do_sample"] = gen["temperature"] > 0
    return gen


# ---- entry point -----------------------------------------------------------------------


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    progress: bool = True,
    dtype: str | None = None,
    overwrite: bool = False,
    keep_quantized: bool = False,
    requantize: str | None = None,
) -> Path:
    """Convert a llama.cpp GGUF file into an HF-layout directory that tinyllm (and
    transformers) can load. The directory appears atomically: everything is written to a
    temporary sibling first and renamed at the end, so an interrupted conversion never
    looks finished. keep_quantized / requantize: the module doc (ignored when dtype is given:
    that asks for floats). Returns the output directory."""
    from .config import ModelConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_request(out_dir, dtype, overwrite, requantize)
    reader = _open(gguf_path)
    meta = _Meta(reader)
    arch, hf_arch = _hf_architecture(meta)
    config = _build_config(meta, reader, arch, hf_arch)
    if dtype is not None:
        config["torch_dtype"] = dtype
    ModelConfig.from_hf(config)  # fail now, not after writing gigabytes, if tinyllm cannot run it
    tok = build_tokenizer(meta)
    keep = keep_quantized and dtype is None
    plan = _plan_tensors(
        reader,
        arch,
        config["num_attention_heads"],
        config["num_key_value_heads"],
        dtype,
        keep,
        requantize if keep else None,
    )
    provenance = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size}
    provenance.update({"converter_version": CONVERTER_VERSION, "dtype": dtype or "auto"})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal directory
        _write_dir(tmp, meta, config, tok, plan, progress, provenance, keep)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_request(out_dir: Path, dtype, overwrite: bool, requantize) -> None:
    """convert_gguf's arguments, checked before the file is read."""
    if dtype is not None and dtype not in OUT_DTYPES:
        raise TinyLLMError(f"unknown output dtype {dtype!r}; choose one of {', '.join(OUT_DTYPES)}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise TinyLLMError(
            f"{out_dir} already exists and is not empty; choose another directory, or pass "
            "--overwrite to replace its files"
        )
    if requantize is not None:
        from .quant import check_format

        check_format(requantize)


def _write_dir(tmp: Path, meta, config, tok, plan, progress: bool, provenance: dict, keep: bool):
    """The converted directory's files into tmp. With keep (quantized tensors kept), the
    provenance also records what was kept per format and the requantization losses."""
    tokenizer, add_bos, add_eos = tok
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", _generation_config(meta, config))
    tokenizer.save(str(tmp / "tokenizer.json"))
    _write_json(
        tmp / "tokenizer_config.json",
        _tokenizer_config(meta, add_bos, add_eos, config["max_position_embeddings"]),
    )
    losses = _write_safetensors(tmp / "model.safetensors", plan, progress)
    if keep:
        kept: dict = {}
        for t in plan:
            if t.fmt and not t.requantized:
                kept[t.fmt] = kept.get(t.fmt, 0) + 1
        provenance.update({"kept_quantized": kept, "requantized": losses})
    _write_json(tmp / PROVENANCE_FILE, provenance)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
