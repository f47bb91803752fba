"""The generate and info commands, run as a user runs them."""

import subprocess
import sys

from tinyllm import LLM, SamplingParams
from tinyllm.config import ModelConfig


def run_cli(*args):
    p = subprocess.run(
        [sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True, timeout=120
    )
    return p.returncode, p.stdout, p.stderr


def test_generate_streams_the_api_text(tiny_factory):
    d = tiny_factory("llama_gqa")
    rc, out, err = run_cli(
        "generate",
        "--model",
        str(d),
        "--prompt",
        "Hello",
        "-n",
        "12",
        "--temperature",
        "0",
        "--backend",
        "numpy",
    )
    assert rc == 0, err
    want = LLM(str(d)).generate(["Hello"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out == want.text + "\n"
    assert "backend: numpy" in err and "kv cache: fp32" in err


def test_seeded_sampling_is_reproducible_from_the_cli(tiny_factory):
    d = tiny_factory("llama_gqa")
    args = (
        "generate",
        "--model",
        str(d),
        "--prompt",
        "Hi",
        "-n",
        "16",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--backend",
        "numpy",
    )
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


def test_info_plans_a_bf16_checkpoint_as_each_backend_holds_it(tiny_factory):
    """The cpu backend keeps a bf16 checkpoint's matrices bf16 (2 bytes/param), numpy turns
    them into float32 (4): `tinyllm info` plans with the bytes the loader will hold, and the
    cpu backend with the host plan (an fp32 KV cache), not a GPU estimate."""
    d = tiny_factory("llama_gqa", "bfloat16")
    outs = {}
    for backend in ("cpu", "numpy"):
        rc, outs[backend], err = run_cli(
            "info", "--model", str(d), "--memory", "1GB", "--backend", backend
        )
        assert rc == 0, err
    assert "at 2 bytes/param" in outs["cpu"] and "at 4 bytes/param" in outs["numpy"]
    assert "fp32 KV cache" in outs["cpu"] and "estimated" not in outs["cpu"]


# ---- the paged KV cache's flags -------------------------------------------------------------

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}


def block_bytes(cfg, kv: str, block_size: int) -> int:
    """One KV block over all layers: K and V of block_size tokens; for int8/fp8 also a float32
    scale per (token, kv head) value vector and an fp16 scale and offset per (kv head,
    channel) for the block's keys (kv_cache.py's layout, written out here)."""
    codes = 2 * block_size * cfg.n_kv_heads * cfg.head_dim * BYTES[kv]
    scales = (
        block_size * cfg.n_kv_heads * 4 + 2 * cfg.n_kv_heads * cfg.head_dim * 2
        if kv in ("int8", "fp8")
        else 0
    )
    return cfg.n_layers * (codes + scales)


def test_kv_cache_flags_reach_the_llm_of_every_command(tiny_factory, tmp_path):
    from tinyllm.cli import build_parser
    from tinyllm.options import load_llm

    d = tiny_factory("llama_gqa")
    cfg = ModelConfig.load(d)
    common = ["-m", str(d), "--backend", "numpy", "--ctx-size", "200"]
    flags = ["--kv-cache-memory", "1MB", "--block-size", "8", "--no-prefix-caching"]
    extra = {
        "generate": ["hi"],
        "chat": [],
        "batch": ["-i", "in", "-o", "out", "--max-batch", "3"],
        "serve": [],
    }
    for cmd, more in extra.items():
        for given in (flags, []):
            a = build_parser().parse_args([cmd, *common, *given, *more])
            llm = load_llm(a, max_batch=getattr(a, "max_batch", 1), quiet=True)
            spec = llm.engine.spec
            if given:
                assert (spec.block_size, llm.engine.prefix_caching) == (8, False), cmd
                assert spec.n_blocks == 2**20 // block_bytes(cfg, "fp32", 8), cmd
            else:  # default: --max-batch sequences of the whole context, in 16-token blocks
                assert (spec.block_size, llm.engine.prefix_caching) == (16, True), cmd
                assert spec.n_blocks == getattr(a, "max_batch", 1) * -(-200 // 16), cmd
    rc, out, err = run_cli("generate", *common, *flags, "-n", "2", "hi")
    n = 2**20 // block_bytes(cfg, "fp32", 8)
    assert (
        rc == 0
        and f"kv cache: fp32 ({n * 8:,} tokens in {n:,} blocks of 8, no prefix caching)" in err
    ), err


def test_bad_kv_cache_flags_are_one_line_errors(tiny_factory):
    d = str(tiny_factory("llama_gqa"))
    for args, words in [
        (["--kv-cache-memory", "4"], "no unit"),
        (["--kv-cache-memory=-1GB"], "negative"),
        (["--kv-cache-memory", "1KB"], "holds no KV block"),
        (["--block-size", "0"], "must be at least 1"),
        (["--block-size", "x"], "not an integer"),
    ]:
        for cmd in ("generate", "info"):
            rc, out, err = run_cli(
                cmd, "-m", d, "--backend", "numpy", *args, *(["hi"] if cmd == "generate" else [])
            )
            if (
                cmd == "info" and words == "holds no KV block"
            ):  # info only reports: 0 blocks in 1 KiB
                assert rc == 0 and "      0 " in out, out
                continue
            assert rc == 2 and "Traceback" not in err, err
            lines = [ln for ln in err.splitlines() if "error:" in ln]
            assert len(lines) == 1 and words in lines[0], err


def test_info_reports_tokens_a_kv_budget_holds(tiny_factory):
    d = tiny_factory("llama_gqa")
    cfg = ModelConfig.load(d)
    for bs in (16, 5):
        rc, out, err = run_cli(
            "info",
            "--model",
            str(d),
            "--backend",
            "numpy",
            "--kv-cache-memory",
            "1MB",
            "--block-size",
            str(bs),
        )
        assert rc == 0, err
        table = out.split(f"KV-cache blocks of {bs} tokens in 1.0 MiB (--kv-cache-memory)")[
            1
        ].splitlines()
        rows = {
            ln.split()[0]: [int(x.replace(",", "")) for x in ln.split()[1:]]
            for ln in table[2:]
            if ln.strip() and ln.split()[0] in BYTES
        }
        assert "open block of keys in float32" in out
        assert set(rows) == set(BYTES)
        for kv, (block, blocks, tokens, contexts) in rows.items():
            assert block == block_bytes(cfg, kv, bs), kv
            assert blocks == 2**20 // block and tokens == blocks * bs, kv
            assert contexts == blocks // -(-cfg.max_position_embeddings // bs), (
                kv
            )  # 256-token contexts
    # Without --kv-cache-memory: what --memory leaves after the weights and working memory.
    rc, out, err = run_cli("info", "--model", str(d), "--backend", "numpy", "--memory", "1GB")
    assert rc == 0 and "(what --memory leaves for the cache)" in out
