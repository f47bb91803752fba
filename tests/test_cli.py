"""The generate and info commands, run as a user runs them."""

import subprocess
import sys

from tinyllm import LLM, SamplingParams
from tinyllm.config import ModelConfig


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_generate_streams_the_api_text(tiny_factory):
    d = tiny_factory("llama_gqa")
    rc, out, err = run_cli("generate", "--model", str(d), "--prompt", "Hello", "-n", "12", "--temperature", "0",
                           "--backend", "numpy")
    assert rc == 0, err
    want = LLM(str(d)).generate(["Hello"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out == want.text + "\n"
    assert "backend: numpy" in err and "kv cache: fp32" in err


def test_seeded_sampling_is_reproducible_from_the_cli(tiny_factory):
    d = tiny_factory("llama_gqa")
    args = ("generate", "--model", str(d), "--prompt", "Hi", "-n", "16", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.9", "--backend", "numpy")
    a = run_cli(*args, "--seed", "7")[1]
    b = run_cli(*args, "--seed", "7")[1]
    c = run_cli(*args, "--seed", "8")[1]
    assert a == b and a != c


def test_info_reports_kv_bytes_and_context(tiny_factory):
    d = tiny_factory("llama_gqa")
    cfg = ModelConfig.load(d)
    rc, out, err = run_cli("info", "--model", str(d), "--memory", "1GB", "--backend", "numpy")
    assert rc == 0, err
    assert "GQA: 4 query heads, 2 KV heads" in out
    # bytes/token = 2 (k, v) * layers * kv heads * head_dim * bytes, and MHA's with n_kv = n_heads
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("bf16"))
    per, mha = (int(x.replace(",", "")) for x in line.split()[1:3])
    assert per == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
    assert mha == 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2
    weights = cfg.n_params() * 4
    assert int(line.split()[3]) == min((2**30 - weights) // per, cfg.max_position_embeddings)
