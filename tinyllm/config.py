"""ModelConfig: the model's shape and hyper-parameters, parsed from HF `config.json`
(classic `rope_theta`/`rope_scaling` keys and the newer `rope_parameters` block) or from
Mistral's native `params.json`. Owns derived sizes (head_dim, n_rep, KV bytes per token).
Imports neither numpy nor cupy; knows nothing about tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import TinyLLMError
from .jsonfile import JsonObject

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Bytes per element of each KV-cache storage dtype ("auto" resolves to the compute dtype).
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}
# Quantized KV dtypes also store scales (kv_cache.py): per (block, kv-head, channel) an fp16
# scale and offset for k, one float32 scale per (token, kv-head) vector for v.
KV_QUANTIZED = ("int8", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int  # e.g. 32000 for Mistral-7B
    dim: int  # hidden size, e.g. 4096
    n_layers: int  # e.g. 32
    n_heads: int  # query heads, e.g. 32
    n_kv_heads: int  # e.g. 8 for Mistral-7B (GQA); 1 is MQA; == n_heads is MHA
    head_dim: int  # e.g. 128; may differ from dim // n_heads (Mistral-Nemo)
    hidden_dim: int  # SwiGLU inner size, e.g. 14336
    norm_eps: float = 1e-5  # RMSNorm epsilon (1e-6 for Qwen2)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # W: query q sees keys q-W+1 .. q
    tie_embeddings: bool = False  # lm_head reuses the embedding table
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # the checkpoint's dtype as declared
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived sizes ------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per KV head: query head h uses KV head h // n_rep."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def kv_bytes_per_token(self, kv_dtype: str, block_size: int = 16) -> int:
        """2 (k and v) * layers * kv_heads * head_dim * bytes, plus for int8/fp8 the scales
        (kv_cache.py): v's float32 scale per token and k's fp16 scale and offset per channel,
        amortized over a block of block_size tokens (rounded up to whole bytes). Not counted:
        each running sequence's open block of full-precision keys (KVCacheSpec.open_nbytes)."""
        b = 2 * self.n_layers * self.n_kv_heads * self.head_dim * KV_DTYPE_BYTES[kv_dtype]
        if kv_dtype in KV_QUANTIZED:
            b += self.n_layers * self.n_kv_heads * 4
            b += -(-self.n_layers * self.n_kv_heads * self.head_dim * 4 // block_size)
        return b

    def mha_kv_bytes_per_token(self, kv_dtype: str) -> int:
        """What the cache would take if every query head had its own K/V (plain MHA)."""
        return replace(self, n_kv_heads=self.n_heads).kv_bytes_per_token(kv_dtype)

    def n_params(self) -> int:
        d, h = self.dim, self.hidden_dim
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        if self.qkv_bias:
            attn += self.q_dim + 2 * self.kv_dim
        per_layer = attn + 3 * d * h + 2 * d
        emb = self.vocab_size * d
        return emb * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d

    # ---- parsing --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict | JsonObject, source: str = "config.json") -> ModelConfig:
        """An HF config.json, every value checked for type and range (jsonfile.py)."""
        c = cfg if isinstance(cfg, JsonObject) else JsonObject(cfg, source)
        archs = c.get("architectures") or []
        if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise c.error("architectures", archs, "must be a list of class names")
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None:
            mt = c.get("model_type")
            if mt in SUPPORTED_ARCHITECTURES.values() and not archs:
                arch = mt
            else:
                name = ", ".join(archs) or _show_name(mt)
                raise TinyLLMError(
                    f"unsupported architecture {name}; supported: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        dim, n_layers = c.int("hidden_size"), c.int("num_hidden_layers")
        vocab, hidden = c.int("vocab_size"), c.int("intermediate_size")
        n_heads, n_kv, head_dim = _heads(
            c, dim, "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"
        )

        # RoPE: newer transformers writes everything under `rope_parameters`.
        rp = c.object("rope_parameters")
        if rp is not None and isinstance(rp.get("full_attention"), dict):
            rp = rp.object("full_attention")
        scaling = rp if rp is not None else c.object("rope_scaling")
        theta = scaling.number("rope_theta", None) if scaling is not None else None
        if theta is None:
            theta = c.number("rope_theta", 10000.0)
        scaling = _normalize_rope_scaling(scaling)

        max_pos = c.int("max_position_embeddings", 4096)
        window = c.int("sliding_window", None)
        if arch == "qwen2" and not c.bool("use_sliding_window", False):
            window = None
        if window is not None and window >= max_pos:
            window = None  # a window as long as the context never masks anything
        bos = c.token_ids("bos_token_id")
        return cls(
            arch=arch,
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_dim=hidden,
            norm_eps=c.number("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5, hi=1.0),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            sliding_window=window,
            tie_embeddings=c.bool("tie_word_embeddings", False),
            qkv_bias=c.bool("attention_bias", False),
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=c.token_ids("eos_token_id"),
            torch_dtype=c.str("torch_dtype") or c.str("dtype") or "float32",
        )

    @classmethod
    def from_mistral_params(
        cls, p: dict | JsonObject, vocab_size: int | None = None
    ) -> ModelConfig:
        """Mistral's native params.json. A missing rope_theta means 1e4 (v0.1 reference),
        not mistral-inference's current 1e6 default."""
        c = p if isinstance(p, JsonObject) else JsonObject(p, "params.json")
        if c.get("moe"):
            raise TinyLLMError(
                "mixture-of-experts params.json (Mixtral) is not supported; supported: dense "
                "Mistral"
            )
        dim = c.int("dim")
        n_heads, n_kv, head_dim = _heads(c, dim, "n_heads", "n_kv_heads", "head_dim", "dim")
        max_pos = c.int("max_seq_len", None) or c.int("max_position_embeddings", 32768)
        return cls(
            arch="mistral",
            vocab_size=c.int("vocab_size", vocab_size),
            dim=dim,
            n_layers=c.int("n_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_dim=c.int("hidden_dim"),
            norm_eps=c.number("norm_eps", 1e-5, hi=1.0),
            rope_theta=c.number("rope_theta", 10000.0),
            max_position_embeddings=max_pos,
            sliding_window=c.int("sliding_window", None),
            tie_embeddings=False,
            bos_token_id=1,
            eos_token_ids=(2,),
            torch_dtype="bfloat16",
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        d = Path(model_dir)
        path = d / "config.json"
        if not path.is_file():
            if (d / "params.json").is_file():
                return cls.from_mistral_params(JsonObject.read(d / "params.json"))
            raise TinyLLMError(
                f"{d} has no config.json (nor a Mistral params.json): is it a model directory?"
            )
        return cls.from_hf(JsonObject.read(path))


def _show_name(v) -> str:
    return (
        repr(v) if isinstance(v, str) and len(v) < 60 else ("None" if v is None else "(not a name)")
    )


def _heads(c: JsonObject, dim: int, heads_key: str, kv_key: str, head_dim_key: str, dim_key: str):
    """(n_heads, n_kv_heads, head_dim), checked: KV heads divide the query heads, head_dim
    is even (RoPE turns pairs) and, when not given, dim splits evenly into heads."""
    n_heads = c.int(heads_key)
    n_kv = c.int(kv_key, n_heads)
    if n_heads % n_kv:
        raise c.error(
            kv_key,
            n_kv,
            f"must divide {heads_key}={n_heads} (each KV head serves a group of query heads)",
        )
    head_dim = c.int(head_dim_key, None)
    if head_dim is None:
        if dim % n_heads:
            raise c.error(
                heads_key, n_heads, f"must divide {dim_key}={dim} when {head_dim_key} is not given"
            )
        head_dim = dim // n_heads
    if head_dim % 2:
        raise c.error(head_dim_key, head_dim, "must be even (RoPE rotates pairs of dimensions)")
    return n_heads, n_kv, head_dim


def _normalize_rope_scaling(s: JsonObject | None) -> dict | None:
    """Return None for plain RoPE, else a dict with `rope_type` set (accepting `type`) and
    its keys checked: factor > 0; llama3 also low_freq_factor > 0, high_freq_factor >
    low_freq_factor and original_max_position_embeddings >= 1."""
    if s is None or not s.data:
        return None
    rtype = s.get("rope_type", s.get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        shown = repr(rtype) if isinstance(rtype, str) and len(rtype) < 40 else "(not a name)"
        raise TinyLLMError(
            f"unsupported RoPE type {shown}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rtype == "default":
        return None
    out = {k: v for k, v in s.data.items() if k != "type"}
    out["rope_type"] = rtype
    out["factor"] = s.number("factor")
    if rtype == "llama3":
        out["low_freq_factor"] = low = s.number("low_freq_factor")
        out["high_freq_factor"] = high = s.number("high_freq_factor")
        if high <= low:
            raise s.error("high_freq_factor", high, f"must be greater than low_freq_factor={low:g}")
        out["original_max_position_embeddings"] = s.int("original_max_position_embeddings")
    return out


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """inv_freq[i] = 1 / theta^(2i/d), then scaled as transformers' modeling_rope_utils does.

    Returned as float64 python floats; backends cast. `d` is head_dim (never dim // n_heads).
    """
    d = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return [f / factor for f in inv]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (transformers _compute_llama3_parameters).
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
