#!/usr/bin/env python3
"""Host cost of a decode step, measurable without a GPU: eager vs CUDA-graph decode on the CuPy
stand-in (tests/fakecupy), for a model with Mistral-7B's launch structure (32 layers, GQA,
SwiGLU, untied head) but tiny widths, so that the stand-in's numpy emulation stays quick.

Per batch size: kernel launches per decode step (eager: every kernel and cuBLAS call the step
makes from Python; graph: the kernels one replay runs, launched from Python as ONE graph
launch) and host time per step, i.e. tinyllm's Python plus the stand-in's launch checks,
minus the emulation time the stand-in measures (its checks stand in for CuPy's own launch
path, so the absolute figures are not a GPU's; the eager/graph ratio is the point). GPU
timings come from scripts/bench_gpu.py.

    python scripts/bench_host.py [--batches 1,8,64] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["TINYLLM_FAKE_CUPY"] = "1"
sys.path[:0] = [str(ROOT / "tests" / "fakecupy"), str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument(
        "--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)"
    )
    ap.add_argument(
        "--ctx",
        type=int,
        default=16,
        help="context before the timed steps (host cost does not depend on it)",
    )
    args = ap.parse_args(argv)

    import cupy
    from bench_gpu import decode_graph_rows

    from tinyllm.backends.cuda_backend import CudaBackend
    from tinyllm.config import ModelConfig
    from tinyllm.model import Transformer
    from tinyllm.weights import LayerWeights, Weights

    cfg = ModelConfig(
        arch="mistral",
        vocab_size=512,
        dim=256,
        n_layers=32,
        n_heads=8,
        n_kv_heads=2,
        head_dim=32,
        hidden_dim=512,
        norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=4096,
        sliding_window=None,
        torch_dtype="bfloat16",
    )
    be = CudaBackend()
    rng = np.random.default_rng(0)

    def w(*shape):
        return be.upload("w", rng.standard_normal(shape).astype(np.float32) * 0.05)

    d, h = cfg.dim, cfg.hidden_dim
    layers = [
        LayerWeights(
            attn_norm=w(d),
            wq=w(cfg.q_dim, d),
            wk=w(cfg.kv_dim, d),
            wv=w(cfg.kv_dim, d),
            wo=w(d, cfg.q_dim),
            ffn_norm=w(d),
            w1=w(h, d),
            w2=w(d, h),
            w3=w(h, d),
        )
        for _ in range(cfg.n_layers)
    ]
    lm_head = w(cfg.vocab_size, d)
    be.mark_logits_weight(lm_head)
    model = Transformer(cfg, Weights(w(cfg.vocab_size, d), layers, w(d), lm_head), be)

    t0 = time.time()
    rows, _ = decode_graph_rows(
        be,
        model,
        args.ctx,
        args.steps,
        [int(b) for b in args.batches.split(",")],
        None,
        emu_seconds=lambda: cupy.STATS["emu_seconds"],
    )
    width = max(len(r[0]) for r in rows)
    print(
        f"\nhost cost per decode step on the CuPy stand-in: {cfg.n_layers} layers, {cfg.n_heads} "
        "heads / "
        f"{cfg.n_kv_heads} kv, fused QKV and gate/up ({time.time() - t0:.0f} s)"
    )
    for r in rows:
        print(f"{r[0]:<{width}}  {r[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
