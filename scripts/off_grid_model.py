"""A copy of a model whose projection matrices are moved off any 4-bit grid, for the weight-
quantization study (BENCHMARKS.md, issue 20).

The embedded SmolLM2 comes from a Q4_1 GGUF: each block of 32 weights takes at most 16
values, so q4_1 (and nearly q4_k) re-quantize it almost losslessly and the study would flatter
them. This adds to every projection matrix gaussian noise of `--scale` times each block's
Q4_1 step (max - min) / 15, and a few outliers per row (`--outliers`, at 8x the row's std, as
real checkpoints carry), so that no block sits on a 4-bit grid any more. The result is a
different model (its own fp32 is the reference in the study), one that still writes text.

    python scripts/off_grid_model.py --src weights/smollm2-135m-instruct --out /tmp/smol-offgrid
    python -m tinyllm eval --backend numpy --model /tmp/smol-offgrid \
        --weights fp32,q8_0,q6_k,q4_k,q4_1,q4_0
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", type=float, default=0.5, help="noise std in Q4_1 steps (0.5)")
    p.add_argument("--outliers", type=int, default=2, help="outliers per row (2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, a.out / f.name)
    tensors = load_file(str(a.src / "model.safetensors"))
    for name, w in tensors.items():
        if not name.endswith("_proj.weight"):
            continue
        w = w.astype(np.float32)
        n, k = w.shape
        b = w.reshape(n, k // 32, 32)
        step = (b.max(-1, keepdims=True) - b.min(-1, keepdims=True)) / 15
        b = b + rng.standard_normal(b.shape).astype(np.float32) * step * a.scale
        w = b.reshape(n, k)
        cols = rng.integers(0, k, (n, a.outliers))
        sign = rng.choice([-1.0, 1.0], (n, a.outliers)).astype(np.float32)
        np.put_along_axis(w, cols, sign * 8 * w.std(axis=1, keepdims=True), axis=1)
        tensors[name] = w
    save_file(tensors, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
