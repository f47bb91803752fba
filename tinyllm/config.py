"""ModelConfig: the model's shape and hyper-parameters, parsed from HF `config.json`
(classic `rope_theta`/`rope_scaling` keys and the newer `rope_parameters` block) or from
Mistral's native `params.json`. Owns derived sizes (head_dim, n_rep, KV bytes per token).
Imports neither numpy nor cupy; knows nothing about tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import TinyLLMError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Bytes per element of each KV-cache storage dtype ("auto" resolves to the compute dtype).
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}
# Quantized KV dtypes also store one float32 scale per (token, kv-head) vector for k and v.
KV_QUANTIZED = ("int8", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # "llama" | "mistral" | "qwen2"
    vocab_size: int                # e.g. 32000 for Mistral-7B
    dim: int                       # hidden size, e.g. 4096
    n_layers: int                  # e.g. 32
    n_heads: int                   # query heads, e.g. 32
    n_kv_heads: int                # e.g. 8 for Mistral-7B (GQA); 1 is MQA; == n_heads is MHA
    head_dim: int                  # e.g. 128; may differ from dim // n_heads (Mistral-Nemo)
    hidden_dim: int                # SwiGLU inner size, e.g. 14336
    norm_eps: float = 1e-5         # RMSNorm epsilon (1e-6 for Qwen2)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # W: query q sees keys q-W+1 .. q
    tie_embeddings: bool = False       # lm_head reuses the embedding table
    qkv_bias: bool = False             # Qwen2: q/k/v projections carry biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"       # the checkpoint's dtype as declared
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

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """2 (k and v) * layers * kv_heads * head_dim * bytes, plus per-vector scales."""
        b = 2 * self.n_layers * self.n_kv_heads * self.head_dim * KV_DTYPE_BYTES[kv_dtype]
        if kv_dtype in KV_QUANTIZED:
            b += 2 * self.n_layers * self.n_kv_heads * 4
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
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            mt = cfg.get("model_type")
            if mt in SUPPORTED_ARCHITECTURES.values() and not archs:
                arch = mt
            else:
                name = ", ".join(archs) or repr(mt)
                raise TinyLLMError(
                    f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            hidden = int(cfg["intermediate_size"])
        except KeyError as e:
            raise TinyLLMError(f"config.json lacks the required key {e.args[0]!r}") from None
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        if n_heads % n_kv:
            raise TinyLLMError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")

        # RoPE: newer transformers writes everything under `rope_parameters`.
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        scaling = dict(rp) if isinstance(rp, dict) else (dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None)
        theta = float((scaling or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = _normalize_rope_scaling(scaling)

        window = cfg.get("sliding_window")
        if arch == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        max_pos = int(cfg.get("max_position_embeddings") or 4096)
        if window is not None and int(window) >= max_pos:
            window = None  # a window as long as the context never masks anything
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            arch=arch, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, hidden_dim=hidden,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)),
            rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
            sliding_window=int(window) if window else None,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    @classmethod
    def from_mistral_params(cls, p: dict, vocab_size: int | None = None) -> "ModelConfig":
        """Mistral's native params.json. A missing rope_theta means 1e4 (v0.1 reference),
        not mistral-inference's current 1e6 default."""
        if p.get("moe"):
            raise TinyLLMError("mixture-of-experts params.json (Mixtral) is not supported; supported: dense Mistral")
        try:
            dim, n_heads = int(p["dim"]), int(p["n_heads"])
            return cls(
                arch="mistral", vocab_size=int(p.get("vocab_size") or vocab_size), dim=dim,
                n_layers=int(p["n_layers"]), n_heads=n_heads,
                n_kv_heads=int(p.get("n_kv_heads") or n_heads),
                head_dim=int(p.get("head_dim") or dim // n_heads),
                hidden_dim=int(p["hidden_dim"]), norm_eps=float(p.get("norm_eps", 1e-5)),
                rope_theta=float(p.get("rope_theta") or 10000.0),
                max_position_embeddings=int(p.get("max_seq_len") or p.get("max_position_embeddings") or 32768),
                sliding_window=int(p["sliding_window"]) if p.get("sliding_window") else None,
                tie_embeddings=False, bos_token_id=1, eos_token_ids=(2,), torch_dtype="bfloat16",
            )
        except (KeyError, TypeError) as e:
            raise TinyLLMError(f"params.json lacks a required key ({e})") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        d = Path(model_dir)
        path = d / "config.json"
        if not path.is_file():
            if (d / "params.json").is_file():
                return cls.from_mistral_params(_read_json(d / "params.json"))
            raise TinyLLMError(f"{d} has no config.json (nor a Mistral params.json): is it a model directory?")
        return cls.from_hf(_read_json(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TinyLLMError(f"cannot read {path}: {e}") from None


def _normalize_rope_scaling(s: dict | None) -> dict | None:
    """Return None for plain RoPE, else a dict with `rope_type` set (accepting `type`)."""
    if not s:
        return None
    s = dict(s)
    rtype = s.get("rope_type", s.get("type", "default"))
    s.pop("type", None)
    s["rope_type"] = rtype
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise TinyLLMError(f"unsupported RoPE type {rtype!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rtype == "default":
        return None
    return s


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
