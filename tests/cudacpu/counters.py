"""Performance counters of one kernel launch from its access trace (tests/cudacpu/tracer.py),
named as Nsight Compute names them, plus occupancy and a stated roofline model.

Requests. Lanes of a warp execute in lockstep, so the k-th time lane i reaches an access site
is the same warp instruction as the k-th time lane j reaches it: one *request* = the accesses
of one warp with the same (site, per-lane occurrence, load/store, space).

Global memory (per load / store):
  requests, bytes requested (sum over lanes), sectors (distinct 32-byte sectors each request
  touches, summed over requests: the L1<->L2 traffic with no reuse), sector efficiency =
  bytes requested / (sectors * 32), per request capped at 100% (a broadcast costs one sector
  and wastes nothing); dram bytes = 32 * (distinct sectors stored + distinct sectors loaded
  before the launch stored them), per buffer (the DRAM traffic with a perfect L2: compulsory
  misses only; a launch's own output read back is an L2 hit, a previous launch's is not).
Shared memory: a request's wavefronts = the largest number of distinct 4-byte words it touches
  in any one of the 32 banks (bank = word % 32; lanes reading the same word are served by one
  broadcast), counted per phase: 8-byte accesses are served a half warp, 16-byte accesses (and
  ldmatrix, one 8x8 matrix = lanes 8i..8i+7) a quarter warp at a time; the ideal is
  ceil(distinct words / 32) per phase (a 16-byte-per-lane request needs 4 even without
  conflicts). Bank-conflict ways = wavefronts / ideal, per site and over the launch.
FLOPs: 2*16*8*16 per warp-level mma.sync.m16n8k16 (the only tensor-core instruction we use);
  FMA kernels are not counted (they are modelled as memory-bound).

Sampling: a launch may run only every s-th block (tracer.py max_blocks). Counts are scaled by
blocks / sampled blocks; a buffer's dram bytes by the same ratio, but never more than the
buffer (a buffer every block reads, like the GEMV's x, is read once: min(ratio * seen, size)).

Known blind spot: GCC instruments one memory reference once per basic block, so a store to the
place the same thread has just loaded (x[i] = f(x[i]): rope_kv_write's in-place rotation of q)
is not reported; such writes are missing from the store counters and DRAM bytes.
Known differences from a GPU: accesses are GCC's, not nvcc's (a thread's adjacent pieces of one
access are merged back up to 16 bytes, see cudacpu_trace.h); lanes that diverge inside a loop
may pair different iterations into one request; shared arrays are laid out by the host
compiler (bank offsets are taken within each array, which starts bank-aligned on the GPU too
when 128-byte aligned).
"""

from __future__ import annotations

import math

import numpy as np

# ---- sm_90 (H100 SXM / H200) limits: CUDA C Programming Guide, "Compute capabilities" table --
SM90 = {
    "sms": 132,  # H100 SXM5 and H200 SXM: 132 SMs
    "regs_per_sm": 65536,
    "reg_alloc_unit": 256,  # registers per warp are allocated in units of 256
    "max_regs_per_thread": 255,
    "smem_per_sm": 228 * 1024,
    "smem_per_block_max": 227 * 1024,
    "smem_reserved_per_block": 1024,  # the runtime reserves 1 KB per CTA (cc 8.0+)
    "threads_per_sm": 2048,
    "warps_per_sm": 64,
    "blocks_per_sm": 32,
}


def _groups(r: np.ndarray) -> np.ndarray:
    """Request id per record: (block, warp, site, occurrence, flags) -> 0..n-1."""
    keys = np.stack(
        [
            r["block"].astype(np.uint64),
            (r["thread"] // 32).astype(np.uint64),
            r["site"],
            r["occ"].astype(np.uint64),
            r["flags"].astype(np.uint64),
        ]
    )
    _, inv = np.unique(keys, axis=1, return_inverse=True)
    return inv.reshape(-1)


def _spans(gid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request id, unit) pairs for every unit from lo to hi inclusive (hi - lo <= 3)."""
    gs, us = [], []
    for k in range(int((hi - lo).max()) + 1 if len(lo) else 0):
        m = lo + k <= hi
        gs.append(gid[m])
        us.append(lo[m] + k)
    if not gs:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return np.concatenate(gs), np.concatenate(us)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(a) == 0:
        return a, b
    p = np.unique(np.stack([a.astype(np.uint64), b.astype(np.uint64)]), axis=1)
    return p[0].astype(np.int64), p[1]


def _first(sec: np.ndarray, rid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sectors and the first record (in execution order) touching each."""
    if len(sec) == 0:
        return sec, rid
    o = np.argsort(rid, kind="stable")
    u, i = np.unique(sec[o], return_index=True)
    return u, rid[o][i]


def _dram(g: np.ndarray, buffers: list[tuple[int, int]], ratio: float) -> float:
    """Compulsory DRAM bytes of the launch with a perfect L2, per buffer: every sector stored
    is written once; a sector loaded is read once unless the launch stored it first (a value
    written and read back, like add_rms_norm's sum, is an L2 hit). Scaled by the sampling
    ratio, reads and writes each at most the buffer's size."""
    if len(g) == 0:
        return 0.0
    lo = g["addr"] >> np.uint64(5)
    hi = (g["addr"] + g["size"].astype(np.uint64) - np.uint64(1)) >> np.uint64(5)
    rid, sec = _spans(np.arange(len(g), dtype=np.int64), lo, hi)
    buf = g["buf"][rid]
    st = (g["flags"][rid] & 1) != 0
    total = 0.0
    for i, (_, n) in enumerate(buffers):
        m = buf == i
        if not m.any():
            continue
        ls, lfirst = _first(sec[m & ~st], rid[m & ~st])
        ss, sfirst = _first(sec[m & st], rid[m & st])
        hit = np.zeros(len(ls), bool)  # loaded after this launch stored it
        if len(ss):
            k = np.minimum(np.searchsorted(ss, ls), len(ss) - 1)
            hit = (ss[k] == ls) & (sfirst[k] < lfirst)
        reads = int((~hit).sum())
        cap = 32.0 * math.ceil(n / 32) + 32
        total += min(32.0 * reads * ratio, cap) + min(32.0 * len(ss) * ratio, cap)
    return total


def count(recs: np.ndarray, info: dict, buffers: list[tuple[int, int]]) -> dict:
    """Counters of one launch (scaled to the whole grid); see the module docstring."""
    ratio = info["blocks"] / max(1, info["sampled"])
    out: dict = {"blocks": info["blocks"], "sampled_blocks": info["sampled"]}
    shared = (recs["flags"] & 2) != 0
    store = (recs["flags"] & 1) != 0
    for kind, sel in (("ld", ~shared & ~store), ("st", ~shared & store)):
        r = recs[sel]
        req = bytes_req = sectors = 0
        eff_bytes = 0.0
        if len(r):
            gid = _groups(r)
            req = int(gid.max()) + 1
            lo = r["addr"] >> np.uint64(5)
            hi = (r["addr"] + r["size"].astype(np.uint64) - np.uint64(1)) >> np.uint64(5)
            g2, _ = _unique_pairs(*_spans(gid, lo, hi))
            sec_per = np.bincount(g2, minlength=req)
            byt_per = np.bincount(gid, weights=r["size"].astype(np.float64), minlength=req)
            sectors = int(sec_per.sum())
            bytes_req = int(byt_per.sum())
            eff_bytes = float(np.minimum(byt_per, 32.0 * sec_per).sum())
        out[f"global_{kind}_requests"] = req * ratio
        out[f"global_{kind}_sectors"] = sectors * ratio
        out[f"global_{kind}_bytes"] = bytes_req * ratio
        out[f"global_{kind}_sector_efficiency"] = eff_bytes / (32.0 * sectors) if sectors else None
    secs = out["global_ld_sectors"] + out["global_st_sectors"]
    out["sector_efficiency"] = (
        (
            (out["global_ld_sector_efficiency"] or 0) * out["global_ld_sectors"]
            + (out["global_st_sector_efficiency"] or 0) * out["global_st_sectors"]
        )
        / secs
        if secs
        else None
    )
    out["dram_bytes"] = _dram(recs[~shared], buffers, ratio)

    # shared memory
    r = recs[shared]
    wf = ideal = reqs = 0
    worst = 1.0
    by_site: dict = {}
    if len(r):
        req_id = _groups(r)
        reqs = int(req_id.max()) + 1
        # 8- and 16-byte accesses are served in half- / quarter-warp phases (and ldmatrix one
        # 8x8 matrix, lanes 8i..8i+7, at a time): banks are counted per phase
        lane = (r["thread"] % 32).astype(np.int64)
        phase = np.where(r["size"] > 8, lane // 8, np.where(r["size"] > 4, lane // 16, 0))
        gid = req_id * 4 + phase
        _, gid = np.unique(gid, return_inverse=True)
        gid = gid.reshape(-1)
        lo = r["addr"] >> np.uint64(2)
        hi = (r["addr"] + r["size"].astype(np.uint64) - np.uint64(1)) >> np.uint64(2)
        nph = int(gid.max()) + 1
        g2, words = _unique_pairs(*_spans(gid, lo, hi))
        nwords = np.bincount(g2, minlength=nph)
        bank = (words & np.uint64(31)).astype(np.int64)
        per_gb = np.bincount(g2 * 32 + bank, minlength=nph * 32).reshape(nph, 32)
        wfs = per_gb.max(axis=1)
        ideals = -(-nwords // 32)
        wf, ideal = int(wfs.sum()), int(ideals.sum())
        site_of = np.zeros(nph, np.uint64)
        site_of[gid] = r["site"]
        for s in np.unique(site_of):
            m = site_of == s
            w = wfs[m].sum() / max(1, ideals[m].sum())
            by_site[int(s)] = w
            worst = max(worst, float(w))
    out["shared_requests"] = reqs * ratio
    out["shared_wavefronts"] = wf * ratio
    out["shared_ideal_wavefronts"] = ideal * ratio
    out["bank_conflict_ways"] = wf / ideal if ideal else None  # over the launch
    out["bank_conflict_ways_worst_site"] = worst if ideal else None
    out["flops"] = 2 * 16 * 8 * 16 * info["mma"] * ratio
    return out


# ---- occupancy and waves ------------------------------------------------------------------------


def occupancy(threads: int, regs: int | None, smem_bytes: int, arch: dict = SM90) -> dict:
    """CTAs per SM and achieved-at-best occupancy (warps / 64) from the block size, ptxas'
    registers per thread (None: unknown, not a limit) and static + dynamic shared memory."""
    warps = -(-threads // 32)
    limits = {
        "threads": arch["threads_per_sm"] // (warps * 32),
        "blocks": arch["blocks_per_sm"],
    }
    if regs:
        per_warp = -(-regs * 32 // arch["reg_alloc_unit"]) * arch["reg_alloc_unit"]
        limits["registers"] = arch["regs_per_sm"] // (per_warp * warps)
    if smem_bytes:
        limits["shared"] = arch["smem_per_sm"] // (smem_bytes + arch["smem_reserved_per_block"])
    per_sm = min(limits.values())
    return {
        "ctas_per_sm": per_sm,
        "limited_by": min(limits, key=limits.get),
        "occupancy": per_sm * warps / arch["warps_per_sm"],
    }


def waves(blocks: int, ctas_per_sm: int, arch: dict = SM90) -> float:
    """Nsight's waves per SM: CTAs / (SMs * CTAs per SM)."""
    return blocks / (arch["sms"] * max(1, ctas_per_sm))


# ---- the performance model ----------------------------------------------------------------------
# Peak figures (sources in BENCHMARKS.md "kernel counters"): bandwidth = what a device-to-device
# copy reaches (PERF.md: ~3.0 TB/s on an H100 SXM of 3.35 TB/s nominal, ~4.3 TB/s on an H200 of
# 4.8 nominal); tensor FLOP/s = what mma.sync flash attention reaches on an H100 (FA2 forward
# ~335 TFLOP/s, PERF.md anchors; wgmma kernels reach more, ours use mma.sync). The
# copy benchmark of scripts/bench_gpu.py replaces the bandwidth when a GPU is lent
# (scripts/gpu_check.sh).
DEVICES = {
    "h100": {"bw": 3.0e12, "mma_flops": 335e12, "launch_us": 3.0},
    "h200": {"bw": 4.3e12, "mma_flops": 335e12 * 1.0, "launch_us": 3.0},
}


def predict_us(
    dram_bytes: float, flops: float, blocks: int, dev: dict, graph: bool, arch: dict = SM90
) -> dict:
    """t = max(bytes / bw, flops / peak) * q + launch (0 inside a CUDA graph), where
    q = ceil(blocks / SMs) * SMs / blocks: the busiest SM runs ceil(blocks / SMs) CTAs of equal
    work while the average SM runs blocks / SMs; an SM is assumed to draw at most 1/SMs of the
    bandwidth and FLOP/s (so a grid of 8 CTAs reaches 8/132 of the peak)."""
    t_mem = dram_bytes / dev["bw"] * 1e6
    t_fl = flops / dev["mma_flops"] * 1e6
    q = math.ceil(blocks / arch["sms"]) * arch["sms"] / blocks if blocks else 1.0
    body = max(t_mem, t_fl) * q
    return {
        "bound": "compute" if t_fl > t_mem else "memory",
        "quantization": q,
        "predicted_us": body + (0.0 if graph else dev["launch_us"]),
    }
