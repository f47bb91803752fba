"""Kernel launches of the CuPy stand-in, executed by the CUDA-on-CPU executor
(tests/cudacpu): the real cuda/*.cu source, compiled for the host, runs over the stand-in's
device memory with exactly the launch's grid, block, dynamic shared memory and arguments.

Races: each launch runs once per thread order (executor.ORDERS: forward, then reverse),
every allocation an argument points into restored before each run; the runs must leave the
same bytes, else the launch fails naming the kernel, the argument and the first differing
byte (executor.Module.launch_checked).

FAKECUPY_KERNELS=emu selects the numpy emulation (cupy/_emu.py) instead: the kernels'
documented semantics, much faster, but no CUDA code runs.
"""

from __future__ import annotations

import bisect
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cudacpu"))
import executor  # noqa: E402  (tests/cudacpu/executor.py)

_modules: dict = {}
_CTYPES = {np.int32: ctypes.c_int, np.uint32: ctypes.c_uint, np.int64: ctypes.c_longlong,
           np.uint64: ctypes.c_ulonglong, np.float32: ctypes.c_float}


def _module(code: str, options: tuple) -> executor.Module:
    key = (code, options)
    if key not in _modules:
        _modules[key] = executor.Module(code, options)
    return _modules[key]


def _allocation(ptr: int) -> np.ndarray:
    """The whole live allocation holding address ptr, as bytes."""
    from . import _allocs, _starts
    i = bisect.bisect_right(_starts, ptr) - 1
    while i >= 0:
        end, ref = _allocs[_starts[i]]
        buf = ref()
        if buf is not None:                      # live allocations never overlap: the nearest one decides
            if ptr < end:
                return buf.reshape(-1).view(np.uint8)
            break
        i -= 1
    raise AssertionError(f"pointer {ptr:#x} is in no live allocation")


def run(kernel, grid, block, conv, shared_mem: int) -> None:
    mod = _module(kernel.code, kernel.options)
    args, touched = [], {}
    for a, (kind, t), param in zip(conv, kernel.types, kernel.params):
        if kind == "ptr":
            ptr = 0 if a is None else a.__array_interface__["data"][0]
            args.append(ctypes.c_void_p(ptr or None))
            if ptr:
                buf = _allocation(ptr)
                touched.setdefault(buf.__array_interface__["data"][0], (buf, f"the allocation of {param}"))
        else:
            args.append(_CTYPES[t](a))
    mod.launch_checked(kernel.name, grid, block, args, shared_mem, list(touched.values()))
