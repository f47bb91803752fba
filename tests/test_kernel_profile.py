"""scripts/kernel_profile.py: a smoke run on a reduced shape (the CI run of the profiler), and
the planted inefficiencies it must catch, each in a COPY of a kernel's source (cuda/*.cu is not
edited): a strided GEMV weight load, a shared tile whose padding is removed (ldmatrix bank
conflicts), a split-K decode grid of 8 CTAs. Cold, the traced builds take ~1-2 minutes on two
cores (cached afterwards in $CUDACPU_CACHE)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_profile as kp  # noqa: E402

from tinyllm.backends import cuda_kernels as ck  # noqa: E402

pytestmark = pytest.mark.skipif(
    kp.tracer.available() is not None, reason=f"cudacpu trace: {kp.tracer.available()}"
)

DEV = kp.counters.DEVICES["h100"]


def row(launch) -> dict:
    return kp.measure([launch], {}, DEV, graph=True)[0]


def test_smoke_run_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = kp.main(
        [
            "--small",
            "--kv",
            "bf16",
            "--ctx",
            "200",
            "--chunk",
            "64",
            "--no-ptxas",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    kernels = [r for r in rows if r.get("phase") != "summary"]
    for k in (
        "kernel",
        "sector_efficiency",
        "dram_bytes",
        "ideal_bytes",
        "bank_conflict_ways",
        "occupancy",
        "waves",
        "predicted_us",
    ):
        assert all(k in r for r in kernels), k
    names = {r["kernel"] for r in kernels}
    assert {"gemv wqkv", "decode_split r4", "flash_prefill v2", "rope_kv_write"} <= names
    # the GEMVs read their weights exactly once, in full sectors
    for r in kernels:
        if r["kernel"].startswith("gemv"):
            assert r["sector_efficiency"] > 0.95
            assert r["dram_bytes"] == pytest.approx(r["ideal_bytes"], rel=0.02)
    summary = [r for r in rows if r.get("phase") == "summary"]
    assert len(summary) == 1 and 0 < summary[0]["pct_roofline"] <= 1
    assert "of roofline" in capsys.readouterr().out


def test_a_strided_gemv_weight_load_shows_as_half_wasted_sectors():
    b = kp.Builder(kp.SMALL, "bf16", 64, 16)
    good = row(b.gemv("gemv", 256, 2048, 1))
    bad = b.gemv("gemv strided", 256, 2048, 1)
    # lane l reads chunk l * (nk8 / 32) + i instead of i * 32 + l: every 16-byte load in its
    # own 32-byte sector
    bad.code = ck.source("matmul.cu").replace(
        "ld_stream_u4(wrow + k8)", "ld_stream_u4(wrow + ((k8 % 32) * (nk8 / 32) + k8 / 32))"
    )
    assert bad.code != ck.source("matmul.cu")
    bad = row(bad)
    assert good["ld_sector_efficiency"] > 0.95
    # the weight loads fetch 2 sectors per 16 bytes used, x's loads (as many requests) are
    # still coalesced: (512 + 512) / ((32 + 16) * 32) bytes per request
    assert bad["ld_sector_efficiency"] == pytest.approx(2 / 3, abs=0.02)
    assert bad["dram_bytes"] == pytest.approx(
        good["dram_bytes"], rel=0.02
    )  # same bytes, worse sectors


def test_a_prefill_tile_without_its_padding_shows_ldmatrix_bank_conflicts():
    s = kp.Shape(dim=512, n_heads=4, n_kv=1, hd=128, hidden=1024, vocab=256, layers=1, window=0)
    b = kp.Builder(s, "bf16", 64, 2)
    c = b.cache(64)
    good = row(b.prefill_attention(64, c, 1))
    bad = b.prefill_attention(64, c, 1)
    src = ck.source("attention_prefill.cu")
    bad.code = src.replace("constexpr int PITCH = HD + 8;", "constexpr int PITCH = HD;")
    assert bad.code != src
    bad = row(bad)
    assert good["bank_conflict_ways_worst_site"] <= 2
    assert bad["bank_conflict_ways_worst_site"] >= 8  # rows 256 bytes apart: one bank group


def test_a_split_k_grid_of_8_ctas_shows_in_waves_and_predicted_time():
    s = kp.Shape(dim=512, n_heads=32, n_kv=8, hd=64, hidden=1024, vocab=256, layers=1, window=0)
    b = kp.Builder(s, "bf16", 4096, 8)
    c = b.cache(4096)
    good = row(b.decode_attention(c, 1)[0])
    bad = row(b.decode_attention(c, 1, n_sms=1)[0])  # the split count of a 1-SM GPU: 1 split
    assert bad["ctas"] == 8 and good["ctas"] >= 132
    assert bad["waves"] < 0.1 <= good["waves"]
    assert bad["quantization"] == pytest.approx(132 / 8)
    assert bad["predicted_us"] > 10 * good["predicted_us"] * good["dram_bytes"] / bad["dram_bytes"]
