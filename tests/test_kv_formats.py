"""The KV-format study (tinyllm/kv_formats.py): round-trip bounds derived from each format's
definition, KIVI's open-block rule (decode steps, chunked prefill, window wraps, prefix
restarts) against a reference written here from the rule, planted key outliers, agreement with
the shipped caches, and `tinyllm eval --kv-formats`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from conftest import tiny_eval

from tinyllm.evaluate import evaluate_kv
from tinyllm.kv_cache import KVCacheSpec
from tinyllm.kv_formats import FORMATS, FormatKVCache

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The licenses for most software and other practical works are designed to take away "
    "your freedom to share and change the works. By contrast, the General Public License is "
    "intended to guarantee your freedom to share and change all versions of a program."
)


def rng_keys(shape, seed=0):
    """Gaussian vectors over five orders of magnitude, and a few all-zero ones."""
    g = np.random.default_rng(seed)
    x = g.standard_normal(shape).astype(np.float32) * np.float32(10.0) ** g.integers(
        -3, 3, shape[:-1] + (1,)
    )
    x[:3] = 0
    return x.astype(np.float32)


# ---- round trips: bounds from each format's definition --------------------------------------


def test_bf16_rounds_to_nearest():
    x = rng_keys((64, 4, 64))
    y = FORMATS["bf16"].k(x)
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-8)  # 8 significant bits: unit roundoff 2^-8
    assert np.array_equal(y, y.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("name, qmax", [("int8-token", 127), ("fp8-token", 448)])
def test_per_token_formats_are_the_shipped_caches(name, qmax):
    from tinyllm.kv_cache import dequantize, quantize

    x = rng_keys((64, 4, 64))
    y = FORMATS[name].k(x)
    kind = name.split("-")[0]
    assert np.array_equal(y, dequantize(*quantize(x, kind)))
    scale = np.abs(x).max(-1, keepdims=True) / qmax
    if kind == "int8":
        bound = scale / 2  # half a step
    else:  # e4m3: 3 mantissa bits, subnormal step 2^-9
        bound = np.maximum(np.abs(x) * 2.0**-4, scale * 2.0**-10)
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-6))


def test_q8_0_is_llama_cpp_blocks():
    x = rng_keys((32, 2, 64))
    y = FORMATS["q8_0"].k(x)
    xb, yb = x.reshape(32, 2, 2, 32), y.reshape(32, 2, 2, 32)
    d = np.abs(xb).max(-1, keepdims=True) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    q = np.divide(yb, d16, out=np.zeros_like(yb), where=d16 > 0)
    assert (
        np.array_equal(q, np.round(q)) and np.abs(q).max() <= 127
    )  # integers times the fp16 scale
    assert np.all(np.abs(yb - xb) <= d / 2 + 127 * np.abs(d - d16) + 1e-6 * np.abs(xb))
    # roundf: halves go away from zero (x = 2.5 d exactly)
    half = np.zeros((1, 32), np.float32)
    half[0, :2] = [127.0, 2.5]
    assert FORMATS["q8_0"].k(half)[0, 1] == 3.0
    with pytest.raises(Exception, match="multiple of 32"):
        FORMATS["q8_0"].k(np.zeros((1, 16), np.float32))


def test_fp8_vllm_is_a_saturating_cast():
    x = np.concatenate([rng_keys((16, 64)).ravel(), [500.0, -1e6, 448.0, 2.0**-12]]).astype(
        np.float32
    )
    y = FORMATS["fp8-vllm"].k(x)
    assert np.all(np.isfinite(y))
    assert list(y[-4:-1]) == [448.0, -448.0, 448.0]
    small = np.abs(x) <= 448
    assert np.all(np.abs(y - x)[small] <= np.maximum(np.abs(x) * 2.0**-4, 2.0**-10)[small])


@pytest.mark.parametrize("kind, qmax", [("int8", 127), ("fp8", 448)])
@pytest.mark.parametrize("zero_point, fp16_meta", [(False, False), (True, False), (True, True)])
def test_kivi_key_blocks_round_trip(kind, qmax, zero_point, fp16_meta):
    from tinyllm.kv_formats import per_channel_blocks

    x = rng_keys((3, 16, 2, 64))  # (blocks, B, kv heads, channels)
    x[:, :, :, 7] += 1000  # an offset channel
    y = per_channel_blocks(x, kind, zero_point, fp16_meta)
    c = (x.max(axis=1, keepdims=True) + x.min(axis=1, keepdims=True)) / 2 if zero_point else 0
    if fp16_meta:
        c = np.float32(c).astype(np.float16).astype(np.float32)
    scale = np.abs(x - c).max(axis=1, keepdims=True) / qmax  # per (block, head, channel)
    slack = 0
    if fp16_meta:  # the scale as stored, and what saturates
        s16 = scale.astype(np.float16).astype(np.float32)
        slack, scale = qmax * np.maximum(scale - s16, 0), s16
    bound = scale / 2 if kind == "int8" else np.maximum(np.abs(x - c) * 2.0**-4, scale * 2.0**-10)
    bound = (
        bound * (1 + 1e-6) + slack + (np.abs(x) + np.abs(c)) * 2.0**-23
    )  # + rounding of x - c and + c
    assert np.all(np.abs(y - x) <= bound)
    assert np.array_equal(
        y[:, :, :, 5], per_channel_blocks(x[:, :, :, 5:6], kind, zero_point, fp16_meta)[..., 0]
    )


def test_bytes_per_token_worked_example():
    """The module docstring's SmolLM2 numbers (30 layers, 3 kv heads, head_dim 64)."""
    b = {n: FORMATS[n].bytes_per_token(30, 3, 64, context=1024) for n in FORMATS}
    assert b["fp32"] == 46_080 and b["bf16"] == 23_040 and b["fp8-vllm"] == 11_520
    assert b["int8-token"] == b["fp8-token"] == b["q8_0"] == 12_240
    assert b["int8-kivi"] == b["fp8-kivi-sym"] == 13_680
    assert b["fp8-kivi"] == b["int8-kivi-zp"] == 30 * 3 * (64 + 8 * 64 / 16 + 68 + 4) == 15_120
    assert b["int8-kivi-zp-f16"] == b["fp8-kivi-f16"] == 13_680
    assert FORMATS["int8-kivi"].bytes_per_token(30, 3, 64, context=4096) == 13_410
    assert b["fp8-kivi-v32"] == 30 * 3 * (80 + 64 + 8 + 4)


# ---- KIVI's open block ------------------------------------------------------------------------


def kivi_expected(raw: np.ndarray, n: int, B: int, qmax=127.0) -> np.ndarray:
    """What the cache must return for positions 0..n-1 of raw (n, h, d): closed blocks
    quantized per channel (absmax/127, round half even), the open block exact. Written from
    the rule, without kv_formats."""
    out = raw[:n].copy()
    for b0 in range(0, n // B * B, B):
        blk = raw[b0 : b0 + B]
        s = np.abs(blk).max(axis=0) / np.float32(qmax)
        q = np.clip(np.rint(blk / np.where(s > 0, s, 1)), -qmax, qmax)
        out[b0 : b0 + B] = q * s
    return out


def make_cache(window=None, max_seq_len=64, B=4, fmt="int8-kivi", chunk=4, block_size=4):
    """A study cache for one sequence whose table owns blocks 0..R-1 (a ring wraps in place)."""
    cfg = SimpleNamespace(n_layers=1, n_kv_heads=2, head_dim=8, sliding_window=window)
    spec = KVCacheSpec.for_model(cfg, "fp32", max_seq_len, chunk=chunk, block_size=block_size)
    return FormatKVCache(spec, FORMATS[fmt], block=B)


def write(cache, raw, start, n):
    pos = np.arange(start, start + n)
    cache.write(
        0, cache.spec.slot_tables([0])[0], pos, raw[pos], 1 - raw[pos]
    )  # V: per token, any values


def read_positions(cache, n):
    """K read back for each position the table still holds after n tokens (its last R rows),
    by position."""
    spec = cache.spec
    lo = max(0, ((n - 1) // spec.block_size - spec.ring + 1) * spec.block_size)
    k, _ = cache.read(0, spec.slot_tables([0])[0], np.arange(lo, n))
    return {p: k[i] for i, p in enumerate(range(lo, n))}


def test_kivi_open_block_is_exact_until_it_closes():
    raw = rng_keys((20, 2, 8), seed=1)
    raw[:, :, 2] *= 500  # an outlier channel
    cache = make_cache(B=4)
    for n in range(1, 14):  # decode: one token a step
        write(cache, raw, n - 1, 1)
        got, want = read_positions(cache, n), kivi_expected(raw, n, 4)
        for p in range(n):
            np.testing.assert_array_equal(got[p], want[p], err_msg=f"position {p} after {n} tokens")
        open_lo = n // 4 * 4
        assert all(np.array_equal(got[p], raw[p]) for p in range(open_lo, n))  # open: exact
    # position 8 was exact while its block was open and changed once block 8..11 closed
    assert not np.array_equal(read_positions(cache, 13)[8], raw[8])


def test_kivi_chunked_prefill_equals_one_shot():
    raw = rng_keys((23, 2, 8), seed=2)
    one, chunked = make_cache(B=4), make_cache(B=4)
    write(one, raw, 0, 23)
    s = 0
    for n in (5, 7, 1, 10):
        write(chunked, raw, s, n)
        s += n
    np.testing.assert_array_equal(one.k[0], chunked.k[0])
    np.testing.assert_array_equal(one.v[0], chunked.v[0])
    got = read_positions(one, 23)
    np.testing.assert_array_equal(np.stack([got[p] for p in range(23)]), kivi_expected(raw, 23, 4))


@pytest.mark.parametrize("window, chunk, B", [(6, 4, 4), (3, 2, 4), (5, 3, 2)])
def test_kivi_rolling_window_wraps(window, chunk, B):
    """A ring (paged blocks of 2) holds, for every position it still has, the value the rule
    gives — also when the window is shorter than a KIVI block (W=3, B=4)."""
    raw = rng_keys((60, 2, 8), seed=3)
    cache = make_cache(window=window, max_seq_len=100, B=B, chunk=chunk, block_size=2)
    cap = cache.spec.capacity
    assert cache.spec.rolling
    max_chunk = cache.spec.max_chunk
    sizes = [1, max_chunk, 2, 1, max_chunk, 3, 1, 1, max_chunk] * 3
    s = 0
    for L in sizes:
        L = min(L, max_chunk, 60 - s)
        if L <= 0:
            break
        write(cache, raw, s, L)
        s += L
        got, want = read_positions(cache, s), kivi_expected(raw, s, B)
        assert len(got) >= min(s, cap - cache.spec.block_size + 1)
        for p, k in got.items():
            np.testing.assert_array_equal(k, want[p], err_msg=f"position {p} after {s} tokens")
    assert s > 3 * cap  # wrapped several times


def test_kivi_prefix_restart_reopens_the_block():
    """Restarting at position 9 (prefix reuse) reopens block 8..11: positions 8..10 read back
    exact; once 11 is written the block is quantized from the kept raw 8 and the new 9..11."""
    a, b = rng_keys((16, 2, 8), seed=4), rng_keys((16, 2, 8), seed=5)
    cache = make_cache(B=4)
    write(cache, a, 0, 14)
    new = a.copy()
    new[9:] = b[9:]
    write(cache, new, 9, 2)  # positions 9, 10
    got = read_positions(cache, 11)
    want = kivi_expected(new, 11, 4)
    for p in range(11):
        np.testing.assert_array_equal(got[p], want[p])
    assert np.array_equal(got[8], a[8])  # reopened: exact again
    write(cache, new, 11, 3)
    got = read_positions(cache, 14)
    want = kivi_expected(new, 14, 4)
    for p in range(14):
        np.testing.assert_array_equal(got[p], want[p])


# ---- planted outliers: attention-output error -------------------------------------------------


def attention_error(fmt: str, seed: int) -> float:
    """Relative error of softmax(q kᵀ/√d) v when K and V go through fmt's cache, for keys
    whose channels 5, 17, 40 carry biases of 100, -300, 1000 on top of N(0, 1) (Qwen2-like),
    queries N(0, 0.5²): 256 keys (the last of 16 blocks of 16 written as 250 + 6), 2 kv heads."""
    g = np.random.default_rng(seed)
    n, h, d = 256, 2, 64
    k = g.standard_normal((n, h, d)).astype(np.float32)
    k[:, :, [5, 17, 40]] += np.asarray([100.0, -300.0, 1000.0], np.float32)
    v = g.standard_normal((n, h, d)).astype(np.float32)
    q = np.float32(0.5) * g.standard_normal((32, h, d)).astype(np.float32)
    spec = KVCacheSpec(1, n // 16, 16, n // 16, h, d, "fp32", None, n)
    cache = FormatKVCache(spec, FORMATS[fmt])
    table = spec.slot_tables([0])[0]
    cache.write(0, table, np.arange(250), k[:250], v[:250])
    cache.write(0, table, np.arange(250, 256), k[250:], v[250:])
    kq, vq = cache.read(0, table, np.arange(n))

    def attend(kk, vv):
        s = np.einsum("qhd,khd->hqk", q, kk) / np.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("hqk,khd->hqd", p / p.sum(-1, keepdims=True), vv)

    ref = attend(k, v)
    return float(np.linalg.norm(attend(kq, vq) - ref) / np.linalg.norm(ref))


def test_planted_outlier_keys_need_per_channel_scales():
    """The error is set by the step on the three planted channels. bf16 rounds the
    1000-channel to half an ulp of 1000 (ulp 4); int8-kivi's step there is 1001/127 ≈ 7.9, so
    at most ~2x bf16 (measured 1.3x), and on the other channels ~3/127. int8-token spends a
    step of ~7.9 on all 64 channels: ~√(64/3) ≈ 4.6x int8-kivi (measured 5.1x). A per-channel
    offset (int8-kivi-zp, fp8-kivi) removes the bias before scaling, so only the N(0, 1) spread
    is quantized: below bf16 (measured 11x and 2.6x); e4m3 without it keeps 1/16 of 1000.
    Means over 3 seeds; the margins are ~1.5x inside the measured ratios."""
    err = {
        f: np.mean([attention_error(f, s) for s in range(3)])
        for f in (
            "bf16",
            "int8-kivi",
            "int8-kivi-zp",
            "int8-token",
            "fp8-kivi",
            "fp8-token",
            "fp8-vllm",
        )
    }
    assert err["int8-kivi"] < 2 * err["bf16"]
    assert err["int8-token"] > 3 * err["int8-kivi"]
    assert err["int8-kivi-zp"] < err["bf16"] / 5
    assert err["fp8-kivi"] < err["bf16"] / 1.5
    assert err["fp8-kivi"] < err["fp8-token"] / 2.5 and err["fp8-kivi"] < err["fp8-vllm"] / 5


# ---- the study layer inside the model -----------------------------------------------------------


def test_study_formats_reproduce_the_shipped_caches(tiny_factory):
    """fp32/bf16/int8-kivi-zp-f16/fp8-kivi-f16 through the study cache give the real fp32, bf16,
    int8 and fp8 caches' logits bit for bit (the same KL and perplexity; 64 tokens: 4 closed
    blocks), so the study measures what a real cache returns."""
    d = tiny_factory("llama_gqa")
    pairs = (
        ("fp32", "fp32"),
        ("bf16", "bf16"),
        ("int8", "int8-kivi-zp-f16"),
        ("fp8", "fp8-kivi-f16"),
    )
    rows, _ = evaluate_kv(
        d,
        TEXT,
        n_tokens=64,
        window=32,
        kv_dtypes=[a for a, _ in pairs],
        kv_formats=[b for _, b in pairs],
    )
    by = {}
    for r in rows:
        by.setdefault(r.kv_dtype, []).append(r)
    for real, study in pairs:
        a, b = by[real][0], by[study][-1]
        assert (a.kl, a.nll, a.top1_agree) == (b.kl, b.nll, b.top1_agree), real
    assert by["int8-kivi-zp-f16"][-1].kl > 0 and by["fp32"][-1].kl == 0


def test_kivi_through_the_engine_with_a_rolling_window(tiny_factory):
    """The sliding-window model: a rolling study cache (capacity W + 4, chunks of at most 5)
    gives the logits of a cache that holds every position, with the same int8-kivi format."""
    from tinyllm.api import LLM
    from tinyllm.kv_formats import FormatBackend
    from tinyllm.memory import engine_for_model
    from tinyllm.model import Transformer

    llm = LLM(str(tiny_factory("mistral_window")), backend="numpy", kv_dtype="fp32", max_seq_len=64)
    ids = llm.tokenizer.encode(TEXT)[:60]

    def logits(chunk):
        be = FormatBackend(FORMATS["int8-kivi"])
        eng = engine_for_model(
            Transformer(llm.cfg, llm.model.w, be),
            llm.tokenizer,
            be,
            set(),
            64,
            "fp32",
            max_batch=1,
            prefill_chunk=chunk,
        )
        out = eng.logits(ids)
        return out, eng.cache.spec

    rolled, spec = logits(4)
    full, full_spec = logits(512)
    assert spec.rolling and not full_spec.rolling
    np.testing.assert_allclose(rolled, full, atol=2e-4, rtol=0)


def plant_biases(src: Path, out: Path, factors):
    spec = importlib.util.spec_from_file_location(
        "plant", ROOT / "scripts" / "plant_qwen2_biases.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.plant(src, out, factors)


def test_tiny_qwen2_with_planted_k_biases(tiny_factory, tmp_path):
    """A k_proj bias of 1000x the key rms in the lowest-frequency RoPE channel (as Qwen2's
    biases): int8-kivi's KL stays at bf16's while int8-token's grows. The random tiny model's
    attention is flat, so V's per-token int8 error (the same in both) is a floor of ~6e-8
    (measured with no bias); with the bias, measured: bf16 1.6e-7, int8-kivi 1.4e-7,
    int8-token 1.0e-6 (7x)."""
    d = plant_biases(tiny_factory("qwen2_bias"), tmp_path / "q", [1000.0])
    rows, _ = evaluate_kv(
        d,
        TEXT,
        n_tokens=128,
        window=64,
        kv_dtypes=(),
        kv_formats=("bf16", "int8-token", "int8-kivi"),
    )
    kl = {r.kv_dtype: r.kl for r in rows}
    assert kl["int8-kivi"] < kl["int8-token"] / 4
    assert kl["int8-kivi"] < 2 * kl["bf16"]


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_eval_kv_formats(tiny_factory, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    d = str(tiny_factory("llama_gqa"))
    rc = tiny_eval(
        d,
        text,
        "--tokens",
        "64",
        "--window",
        "32",
        "--kv-formats",
        "int8-token,int8-kivi,fp8-kivi",
        "--kv-dtypes",
        "int8",
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("plan: 64 tokens") and "int8-kivi" in lines[0]
    assert lines[1].startswith("estimate: 5 passes x 2 segments")
    table = [line for line in lines if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [
        "int8",
        "int8-token",
        "int8-kivi",
        "fp8-kivi",
    ]
    assert (
        table[2].split("|")[5:7] == table[3].split("|")[5:7]
    )  # real int8 == study int8-token (KL, Δlogit)
    assert (
        tiny_eval(
            d,
            text,
            "--tokens",
            "32",
            "--window",
            "32",
            "--kv-formats",
            "int8-kivi",
            "--kivi-block",
            "8",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "(KIVI key block 8 tokens)" in out
    from tinyllm.api import LLM

    cfg = LLM(d).cfg
    want = FORMATS["int8-kivi"].bytes_per_token(
        cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 32, block=8
    )
    assert f"| int8-kivi | {want:,.0f} |" in out
    assert tiny_eval(d, text, "--kv-formats", "int4-kivi") == 2
    assert "unknown kv format 'int4-kivi'" in capsys.readouterr().err
    assert tiny_eval(d, text, "--tokens", "64", "--window", "32", "--kv-formats", "q8_0") == 2
    assert "q8_0 needs head_dim to be a multiple of 32" in capsys.readouterr().err


def test_cli_eval_defaults_on_numpy_are_the_study_formats(tiny_factory, tmp_path, capsys):
    """No --kv-dtypes/--kv-formats on numpy: the real bf16/int8/fp8 caches next to the default
    study formats (the anchors), q8_0 skipped with a note where head_dim (16 here) is not a
    multiple of 32."""
    from tinyllm.evaluate import DEFAULT_FORMATS, DEFAULT_NUMPY_DTYPES

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert tiny_eval(tiny_factory("llama_gqa"), text, "--tokens", "32", "--window", "32") == 0
    out = capsys.readouterr().out
    assert "skipped: kv format q8_0 needs head_dim to be a multiple of 32" in out
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert names == DEFAULT_NUMPY_DTYPES.split(",") + [
        f for f in DEFAULT_FORMATS.split(",") if f != "q8_0"
    ]
