"""The access-tracing build of a kernel module: the same rewritten source and -D options as
executor.Module, compiled with cudacpu_trace.h and GCC's kernel-address instrumentation in
call mode (every load and store of every thread calls a hook; see cudacpu_trace.h), so that
tests/cudacpu/counters.py can count what the launch does to memory. A separate build: the
plain and ASan builds of executor.py are untouched. GCC only (clang's kernel-address mode has
no call-threshold parameter); available() says why not.

    m = TraceModule(code, options)
    recs, info = m.trace("kernel", grid, block, args, shared_mem, buffers, max_blocks=64)

buffers: (address, nbytes) of every allocation the arguments point into (accesses elsewhere
are not device memory and are dropped). max_blocks: run only one block in s (s =
ceil(blocks / max_blocks), by a hash of the block index: about blocks / s of them, spread over
the grid), the rest exit at once; info says how many ran.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import executor
import numpy as np

TRACE_HEADER = executor.HERE / "cudacpu_trace.h"

# One record per access (cudacpu_trace.h struct Rec).
REC = np.dtype(
    [
        ("addr", "<u8"),
        ("site", "<u8"),
        ("occ", "<u4"),
        ("block", "<u4"),
        ("thread", "<u2"),
        ("size", "u1"),
        ("flags", "u1"),
        ("buf", "<u2"),
        ("pad", "<u2"),
    ]
)
assert REC.itemsize == 32


def available() -> str | None:
    why = executor.available()
    if why:
        return why
    v = subprocess.run([executor.compiler(), "--version"], capture_output=True, text=True).stdout
    if "clang" in v.lower() or "Free Software Foundation" not in v:
        return "the tracing build needs GCC (set CXX=g++)"
    return None


def _flags() -> list[str]:
    return [
        "-std=c++17",
        "-O1",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-w",
        "-fno-strict-aliasing",
        "-include",
        str(executor.HEADER),
        "-include",
        str(TRACE_HEADER),
        f"-I{executor.cuda_include()}",
        "-fsanitize=kernel-address",
        "--param",
        "asan-instrumentation-with-call-threshold=0",
        "--param",
        "asan-stack=0",
        "--param",
        "asan-globals=0",
    ]


def _rewrite_static_shared(text: str) -> str:
    """`__shared__ T a[N], b[M];` -> storage a__store, b__store plus references a, b through an
    opaque pointer. GCC's instrumentation skips accesses to a static array at a constant index
    it can prove in bounds (asan.cc instrument_derefs), so kernels must reach the arrays through
    a pointer for every access to call the hooks. Registered with the runtime as executor.py
    registers them; `extern __shared__` (the dynamic buffer, already a pointer) is left to
    executor.rewrite."""

    def repl(m: re.Match) -> str:
        if m.group(1):
            return m.group(0)
        am = re.search(r"__align__\s*\(\s*(\d+)\s*\)", m.group(2))
        align = f"alignas({am.group(1)}) " if am else ""
        decl = re.sub(r"__align__\s*\(\s*\d+\s*\)", "", m.group(2)).strip()
        parts = executor._split_top(decl, ",")
        first = re.match(r"(.*?)(\w+)\s*(\[.*)?$", parts[0].strip(), re.S)
        typ = first.group(1)
        names = [(first.group(2), first.group(3) or "")]
        names += [re.match(r"\s*(\w+)\s*(\[.*)?$", p, re.S).groups() for p in parts[1:]]
        out = []
        for n, dims in names:
            out.append(
                f"{align}static {typ} {n}__store{dims or ''}; "
                f"static auto& {n} = *::cudacpu_trace::opaque(&{n}__store); "
                f"static const bool _cudacpu_shared_{n} = "
                f"::cudacpu_trace::shared_static(&{n}, sizeof({n})); (void)_cudacpu_shared_{n};"
            )
        return " ".join(out)

    return executor._SHARED.sub(repl, text)


class TraceModule(executor.Module):
    def __init__(self, code: str, options: tuple = ()):
        why = available()
        if why:
            raise RuntimeError(f"cudacpu trace: {why}")
        self.entries = executor.entry_points(code, options)
        defines = [o for o in options if o.startswith("-D")]
        src = (
            executor.rewrite(_rewrite_static_shared(code))
            .replace("::cudacpu::ptx_find(", "::cudacpu_trace::ptx_find(")
            .replace("::cudacpu::shared_static(", "::cudacpu_trace::shared_static(")
        )
        wrap = executor._wrappers(self.entries)
        for name in self.entries:  # every thread of a block not sampled exits at once
            wrap = wrap.replace(
                f"[a]() {{ {name}(", f"[a]() {{ if (::cudacpu_trace::block_sampled()) {name}("
            )
        src += wrap
        version = subprocess.run(
            [executor.compiler(), "--version"], capture_output=True, text=True
        ).stdout
        flags = _flags() + defines
        key = hashlib.sha256(
            "\0".join(
                [
                    "trace",
                    src,
                    executor.HEADER.read_text(),
                    TRACE_HEADER.read_text(),
                    *flags,
                    version,
                ]
            ).encode()
        ).hexdigest()[:24]
        so = executor._cache_dir() / f"trace-{key}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory() as tmp:
                cu = Path(tmp) / "kernel.cpp"
                cu.write_text(src)
                out = Path(tmp) / "k.so"
                p = subprocess.run(
                    [executor.compiler(), *flags, "-x", "c++", str(cu), "-o", str(out)],
                    capture_output=True,
                    text=True,
                )
                if p.returncode:
                    raise RuntimeError(f"cudacpu trace: compiling failed:\n{p.stderr[-4000:]}")
                tmp_so = so.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(out, tmp_so)
                os.replace(tmp_so, so)
        self.lib = ctypes.CDLL(str(so))
        self._fns = {}
        self.lib.cudacpu_trace_begin.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_int,
            ctypes.c_longlong,
        ]
        self.lib.cudacpu_trace_end.restype = ctypes.c_longlong
        self.lib.cudacpu_trace_end.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_longlong),
            ctypes.POINTER(ctypes.c_longlong),
        ]

    def trace(
        self,
        name: str,
        grid,
        block,
        args: list,
        shared_mem: int,
        buffers: list[tuple[int, int]],
        max_blocks: int | None = None,
    ) -> tuple[np.ndarray, dict]:
        """Run one launch (thread order 0) recording its accesses. Returns (records, info):
        info has blocks (the grid's), sampled (blocks that ran), mma (warp-level mma.sync
        instructions executed)."""
        grid = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        nblocks = grid[0] * grid[1] * grid[2]
        stride = 1 if not max_blocks else max(1, -(-nblocks // max_blocks))
        lohi = (ctypes.c_uint64 * max(1, 2 * len(buffers)))(
            *[v for a, n in buffers for v in (a, a + n)]
        )
        self.lib.cudacpu_trace_begin(lohi, len(buffers), stride)
        self.launch(name, grid, block, args, shared_mem, 0)
        data, sampled, mma = ctypes.c_void_p(), ctypes.c_longlong(), ctypes.c_longlong()
        n = self.lib.cudacpu_trace_end(ctypes.byref(data), ctypes.byref(sampled), ctypes.byref(mma))
        if n:
            buf = (ctypes.c_char * (n * REC.itemsize)).from_address(data.value)
            recs = np.frombuffer(buf, REC).copy()
        else:
            recs = np.zeros(0, REC)
        return recs, {
            "blocks": nblocks,
            "sampled": int(sampled.value),
            "mma": int(mma.value) // 32,
        }
