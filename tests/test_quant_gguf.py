"""`tinyllm convert` keeps llama.cpp's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices quantized (weights.py's
layout, bit for bit) and requantizes other types with the loss measured (none for Q5_0: kept
exactly as q8_0). The GGUFs are made with the gguf package from the embedded SmolLM2 (its
first layers, to keep the test short): a Q8_0 file; a file mixed the way llama.cpp's Q4_K_M
recipe mixes SmolLM2 (Q4_K / Q6_K where rows divide into 256, i.e. ffn_down; Q5_0 / Q8_0
fallbacks for the 576-wide matrices); and that mix with Q8_0 in place of Q5_0. Each file's
logits equal (not close to) those of the file dequantized to float32."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinyllm import quant

gguf = pytest.importorskip("gguf")
# Reading SmolLM2's GGUF metadata (its 49k-token vocabulary) three times dominates: ~40 s on an
# idle 2-core machine, 190 s measured with 7 other helpers' processes busy.
pytestmark = pytest.mark.slow
GT = gguf.GGMLQuantizationType
N_LAYERS = 3


def remix(r, dst, type_of, n_layers=N_LAYERS):
    """Copy reader r's metadata and first n_layers to dst; each 2-D tensor becomes
    type_of(name) (None: its blocks copied as they are). Q4_K/Q6_K blocks come from
    quant.quantize (the gguf package cannot make them), the others from gguf.quants.quantize."""
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = n_layers if key == f"{arch}.block_count" else f.contents()
        w.add_key_value(key, val, f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
            continue
        kind = type_of(t.name) if len(t.shape) == 2 else None
        if kind is None:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        k, n = (int(v) for v in t.shape)
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(n, k)
        if kind in ("Q4_K", "Q6_K"):
            raw = quant.to_gguf_blocks(quant.quantize(a, kind.lower()))
        else:
            raw = gguf.quants.quantize(a, GT[kind])
        w.add_tensor(t.name, raw, raw_dtype=GT[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def q4_k_m(name: str):
    """llama.cpp's Q4_K_M choices for SmolLM2 (dim 576, so only ffn_down divides into 256):
    ffn_down Q6_K on 'more bits' layers else Q4_K; attn_v Q6_K -> Q8_0 fallback on those
    layers; the other 576-wide matrices Q4_K -> Q5_0 fallback; token_embd kept."""
    if name == "token_embd.weight":
        return None
    layer = int(name.split(".")[1])
    more = layer % 2 == 0
    if ".ffn_down." in name:
        return "Q6_K" if more else "Q4_K"
    if ".attn_v." in name and more:
        return "Q8_0"
    return "Q5_0"


def q4_k_m_supported(name: str):
    """The Q4_K_M mix with every fallback a type we keep (Q8_0 for the 576-wide matrices), as
    a GGUF of only Q4_K / Q6_K / Q8_0 tensors: nothing is requantized."""
    kind = q4_k_m(name)
    return "Q8_0" if kind == "Q5_0" else kind


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_gguf_path):
    """{label: (GGUFReader, converted quantized dir, converted dequantized dir)}. Parsing
    SmolLM2's 49k-token vocabulary dominates a GGUFReader, so each file is read once and
    convert_gguf is handed that reader."""
    from tinyllm import gguf_convert

    d = tmp_path_factory.mktemp("qgguf")
    source = gguf.GGUFReader(str(smollm2_gguf_path))
    out = {}
    for label, type_of in (
        ("q8_0", lambda n: None if n == "token_embd.weight" else "Q8_0"),
        ("q4_k_m", q4_k_m),
        ("q4_k_q6_k_q8_0", q4_k_m_supported),
    ):
        path = remix(source, d / f"{label}.gguf", type_of)
        reader = gguf.GGUFReader(str(path))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gguf_convert, "_open", lambda p, reader=reader: reader)
            out[label] = (
                reader,
                gguf_convert.convert_gguf(path, d / f"{label}_q", False, keep_quantized=True),
                gguf_convert.convert_gguf(path, d / f"{label}_f", False),  # dequantized
            )
    return out


def logits_of(model_dir, ids):
    from tinyllm.api import LLM

    llm = LLM(str(model_dir), max_seq_len=64, max_batch=1)
    return llm, llm.logits(ids)


IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282]


def test_q8_0_gguf_kept_bit_exact_and_logits_equal_the_dequantized_file(files):
    r, qdir, fdir = files["q8_0"]
    prov = json.loads((qdir / "tinyllm_convert.json").read_text())
    assert prov["kept_quantized"] == {"q8_0": 7 * N_LAYERS} and prov["requantized"] == {}
    llm, got = logits_of(qdir, IDS)
    assert set(llm.model.w.formats.values()) == {"q8_0"}
    assert isinstance(llm.model.w.embed, np.ndarray)  # the embedding table is float
    # bit for bit: the parts are the GGUF's blocks (q rows un-permuted whole)
    raw = {t.name: np.asarray(t.data) for t in r.tensors}
    w0 = llm.model.w.layers[0]
    from tinyllm.gguf_convert import unpermute_rows

    np.testing.assert_array_equal(
        quant.to_gguf_blocks(w0.wv), raw["blk.0.attn_v.weight"].reshape(w0.wv.shape[0], -1)
    )
    np.testing.assert_array_equal(
        quant.to_gguf_blocks(w0.wq),
        unpermute_rows(raw["blk.0.attn_q.weight"].reshape(576, -1), 9),
    )
    _, want = logits_of(fdir, IDS)
    np.testing.assert_array_equal(got, want)


def test_q4_k_m_gguf_kept_whole_q5_0_exactly_as_q8_0_and_logits_equal(files):
    r, qdir, fdir = files["q4_k_m"]
    prov = json.loads((qdir / "tinyllm_convert.json").read_text())
    more = (N_LAYERS + 1) // 2  # layers 0, 2, ...
    assert prov["kept_quantized"] == {
        "q6_k": more,
        "q4_k": N_LAYERS - more,
        "q8_0": more,
    }
    loss = prov["requantized"]["Q5_0 -> q8_0"]  # 576-wide: no q4_k; Q5_0 kept exactly as q8_0
    assert loss["tensors"] == 7 * N_LAYERS - 2 * more - (N_LAYERS - more)
    assert loss["rel_rms_error"] == 0.0
    llm, got = logits_of(qdir, IDS)
    fm = llm.model.w.formats
    assert fm["model.layers.0.mlp.down_proj.weight"] == "q6_k"
    assert fm["model.layers.1.mlp.down_proj.weight"] == "q4_k"
    d1 = llm.model.w.layers[1].w2
    blocks = np.asarray(next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight").data)
    np.testing.assert_array_equal(quant.to_gguf_blocks(d1), blocks.reshape(576, -1))
    # the Q5_0 tensors hold gguf's own Q5_0 values, bit for bit, as q8_0 blocks
    v1 = llm.model.w.layers[1].wv
    t = next(t for t in r.tensors if t.name == "blk.1.attn_v.weight")
    assert t.tensor_type == GT.Q5_0 and v1.fmt == "q8_0"
    np.testing.assert_array_equal(
        quant.dequantize(v1), gguf.quants.dequantize(t.data, t.tensor_type).reshape(v1.shape)
    )
    # so nothing was lost: the logits equal (not close to) the dequantized file's
    _, want = logits_of(fdir, IDS)
    np.testing.assert_array_equal(got, want)


def test_q4_k_q6_k_q8_0_gguf_kept_whole_and_logits_equal_the_dequantized_file(files):
    """Every matrix in a supported type: all kept as they are, and the logits equal (not
    close to) those of the file dequantized to float32 by convert."""
    r, qdir, fdir = files["q4_k_q6_k_q8_0"]
    prov = json.loads((qdir / "tinyllm_convert.json").read_text())
    more = (N_LAYERS + 1) // 2
    assert prov["kept_quantized"] == {
        "q6_k": more,
        "q4_k": N_LAYERS - more,
        "q8_0": 6 * N_LAYERS,
    }
    assert prov["requantized"] == {}
    llm, got = logits_of(qdir, IDS)
    assert set(llm.model.w.formats.values()) == {"q4_k", "q6_k", "q8_0"}
    _, want = logits_of(fdir, IDS)
    np.testing.assert_array_equal(got, want)
