#!/usr/bin/env python3
"""Predicted vs measured time per kernel, on a GPU (scripts/gpu_check.sh runs it): the model of
scripts/kernel_profile.py calibrated the first time a device exists.

Takes the JSON of a kernel_profile.py run (the counters come from the CPU executor), measures
the device's copy bandwidth (a 1 GiB device-to-device copy, bytes read + written / time), then
builds the same launches (kernel_profile.Builder with device allocations: the big ones filled
with random bf16 values in [2^-7, 1), never all zeros) and times each with CUDA events (median
of --iters launches after a warm-up). The prediction is recomputed with the measured bandwidth
and no launch cost (back-to-back launches of one kernel). Needs CuPy and a GPU.

    python scripts/kernel_profile.py --kv bf16 --no-prefill --json /tmp/prof.json
    python scripts/kernel_calibrate.py /tmp/prof.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_profile as kp  # noqa: E402

from tinyllm.backends import cuda_kernels as ck  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="kernel_profile.py --json output")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 (no CuPy, no driver, no device: one line)
        print(
            f"kernel_calibrate: no GPU through CuPy ({e}); run it on a GPU machine", file=sys.stderr
        )
        return 2
    rows = json.loads(Path(args.profile).read_text())
    rng = cp.random.default_rng(0)

    def aligned(n):
        a = cp.zeros(int(n), cp.uint8)
        if n >= 1 << 20:  # weights, caches: random bf16 in [2^-7, 1)
            a[: n // 2 * 2].view(cp.uint16)[:] = rng.integers(
                0x3C00, 0x3F80, n // 2, dtype=cp.uint16
            )
        return a

    kp.aligned = aligned
    kp.put = lambda dst, v: dst.set(np.asarray(v, dst.dtype))

    def timed(fn, iters):
        fn()
        cp.cuda.Device().synchronize()
        ev = [cp.cuda.Event() for _ in range(iters + 1)]
        ev[0].record()
        for i in range(iters):
            fn()
            ev[i + 1].record()
        ev[-1].synchronize()
        return float(np.median([cp.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i in range(iters)]))

    def copy_bw() -> float:
        src = cp.zeros(1 << 30, cp.uint8)
        dst = cp.empty_like(src)
        return 2 * src.nbytes / (timed(lambda: cp.copyto(dst, src), 20) * 1e-3)

    bw = copy_bw()
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s (read + write)")

    def convert(a):
        if isinstance(a, ctypes.c_void_p):
            return np.uint64(a.value or 0)
        return {ctypes.c_int: np.int32, ctypes.c_float: np.float32, ctypes.c_longlong: np.int64}[
            type(a)
        ](a.value)

    out = []
    for kv in sorted({r["kv"] for r in rows if r.get("phase") == "decode"}):
        ctx = next(r for r in rows if r.get("kv") == kv and r.get("phase") == "summary")
        prof = {r["kernel"]: r for r in rows if r.get("kv") == kv and r.get("phase") == "decode"}
        shape = kp.SMALL if ctx.get("small") else kp.Shape()
        launches = kp.decode_step(shape, kv, int(ctx.get("ctx", 4096)), 1)
        print(f"\n## decode, KV {kv}: predicted (measured bandwidth) vs measured, per launch")
        print(f"{'kernel':<20} {'pred us':>8} {'meas us':>8} {'meas/pred':>9}")
        for la in launches:
            r = prof.get(la.label)
            if r is None:
                continue
            k = ck.get(la.file, la.kernel, smem=la.smem, **la.defines)
            cargs = tuple(convert(a) for a in la.args)
            t = (
                timed(
                    lambda k=k, la=la, cargs=cargs: k(
                        la.grid, (la.block,), cargs, shared_mem=la.smem
                    ),
                    args.iters,
                )
                * 1e3
            )
            body = max(r["dram_bytes"] / bw, r["flops"] / kp.counters.DEVICES["h100"]["mma_flops"])
            pred = body * 1e6 * r["quantization"]
            print(f"{la.label:<20} {pred:>8.2f} {t:>8.2f} {t / pred:>9.2f}")
            out.append({"kv": kv, "kernel": la.label, "predicted_us": pred, "measured_us": t})
    if args.json:
        Path(args.json).write_text(json.dumps({"copy_bw": bw, "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
