"""The per-kernel verification table of VERIFICATION.md, from a run of the GPU tests on the
CUDA-on-CPU executor:

    TINYLLM_FAKE_CUPY=1 PYTHONPATH=tests/fakecupy FAKECUPY_LAUNCH_LOG=/tmp/launches.json \\
        python -m pytest -q tests/test_cuda_ops.py tests/test_cuda_model.py \\
        -k "not 32k and not smollm2 and not 1000_decode_steps"
    python scripts/cudacpu_table.py /tmp/launches.json

Every launch in that run executed the kernel's real source on the CPU (twice: forward and
reverse thread order) and every test compared the result with the numpy twin, so a row here
means: launched that many times in those geometries, and every test that launched it passed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

KINDS = {"0": "bf16", "1": "fp16", "2": "fp32", "3": "int8", "4": "fp8"}


def main(path: str) -> None:
    rows: dict = defaultdict(lambda: [set(), 0, set()])
    for name, kind, n, geoms in json.load(open(path)):
        r = rows[name]
        if kind is not None:
            r[0].add(KINDS[kind])
        r[1] += n
        r[2].update(geoms)
    print(
        "| entry point | KV kinds | launches | distinct geometries (grid * threads [+ dyn. smem]), "
        "sample |"
    )
    print("|---|---|---:|---|")
    for name in sorted(rows):
        kinds, n, geoms = rows[name]
        order = [k for k in KINDS.values() if k in kinds]
        sample = ", ".join(sorted(geoms, key=lambda g: (len(g), g))[:3])
        print(f"| `{name}` | {', '.join(order) or '-'} | {n} | {len(geoms)}: {sample} |")


if __name__ == "__main__":
    main(sys.argv[1])
