"""A numpy stand-in for CuPy, for testing tinyllm's CUDA backend on a machine without a GPU.

What it is. A package named `cupy` (with `cupy_backends.cuda.libs.cublas` beside it) giving
the small part of CuPy that tinyllm/backends/cuda_backend.py uses, and one fake device (an
"H100": compute capability 9.0, 132 SMs). "Device" arrays are numpy arrays in host memory (the
numpy subclass `ndarray` below, whose .data.ptr is the real address). Every kernel launch
RUNS THE REAL KERNEL: cupy/_cpu.py hands it to the CUDA-on-CPU executor (tests/cudacpu), which
compiles the module's exact source and -D options for the host and executes the launch over
these buffers, twice in opposite thread orders (races), with AddressSanitizer when the process
preloads it (tests/test_cuda_host.py does). FAKECUPY_KERNELS=emu swaps in cupy/_emu.py, a numpy
emulation of each kernel's documented semantics from its raw arguments (faster; it asserts the
launch preconditions listed below, but runs no CUDA code). tests/test_cuda_host.py puts tests/fakecupy/
first on the PYTHONPATH of a subprocess (never of the main test process) and runs the GPU
tests there. The package refuses to import unless TINYLLM_FAKE_CUPY=1 is set, so that it can
never pass for a GPU by accident.

What it checks (an AssertionError fails the test that made the call):
  * a kernel exists as an extern "C" entry point of its module's source, as the host C
    preprocessor expands it with the module's -D options (../cuda_entry_points.py);
  * per launch: the argument count; each scalar's exact numpy type against its C parameter
    type (np.int32 for int, np.int64 for long long, ...); each pointer is a device array (or
    np.uint64(0), a null pointer) whose dtype matches the pointee type (bf16, float, int, the
    cache storage type of KV_KIND for kv_t) and whose address is aligned for it; block size
    <= the kernel's __launch_bounds__ (1024 without); no empty grid or block; grid y and z
    <= 65535; dynamic shared memory <= what was enabled on the kernel (48 KB by default);
  * every byte a kernel reads or writes lies inside a live allocation: AddressSanitizer's
    redzones under the executor (the emulation checks each element against ONE allocation);
    new allocations are poisoned (0xFF bytes: NaN as floats) so that outputs a launch failed
    to write show up;
  * with FAKECUPY_KERNELS=emu, each kernel's launch preconditions: the grid covers the work
    (rows, columns, heads, tiles, splits), vectorized versions get 16-byte-aligned pointers
    and strides that are multiples of 8, head_dim fits the compiled tile, ...;
  * async uploads: a host buffer is not copied from again while an earlier copy from it has
    not been waited on (an event recorded after it synchronized, or a device-to-host copy);
  * cuBLAS gemmEx: the one operand/type/compute combination tinyllm uses, alpha 1, beta 0,
    every operand column inside its allocation;
  * CUDA graphs (cuda.Stream.begin_capture / end_capture -> cuda.graph.Graph, .launch()):
    while a stream captures, kernel launches are RECORDED, not run, with their arguments as
    the raw values of that moment (pointers as bare addresses: the graph keeps no array
    alive); Graph.launch() replays them in order, so a Python scalar that changes per step
    replays stale and a buffer freed since capture fails the bounds check, as on a GPU.
    Host-to-device copies between replays land in device memory before the replay reads it.
    Capture on the default stream, launches or copies on another stream while one captures,
    device allocations (cupy.empty/zeros/asarray, numpy results on device arrays),
    device-to-host copies (.get(), asnumpy, synchronize) are AssertionErrors during capture
    (CuPy's relaxed mode would let cudaMalloc through, but a buffer allocated inside a
    capture is reused by the pool once Python drops it: tinyllm allocates every graph buffer
    before capture); cuBLAS raises NotImplementedError, as CuPy 14 does. Counters in STATS:
    launches (kernels and cuBLAS calls run, eager or replayed) and emu_seconds (time spent
    emulating them, and replaying graphs: the device's time, for host timings to subtract).

What it does NOT verify: what only a GPU shows (timing, the real memory model across blocks
and streams, register and shared-memory budgets beyond what ptxas reports in
scripts/check_kernels.py, bank conflicts; tests/cudacpu/cudacpu.h says what the executor
models). Streams run serially (a graph runs when launched); in-place array operations on
device arrays during a capture run at once instead of being captured. It knows
only the CuPy calls tinyllm makes, with numpy semantics for array operations: a call that real
CuPy would reject may pass here.
"""

from __future__ import annotations

import atexit
import bisect
import ctypes
import json
import os
import time
import types
import weakref

import numpy as np
from cuda_entry_points import entry_points  # tests/fakecupy/cuda_entry_points.py

if os.environ.get("TINYLLM_FAKE_CUPY") != "1":
    raise ImportError("tests/fakecupy is a test stand-in for CuPy; it loads only with TINYLLM_FAKE_CUPY=1")

# ---- device memory: numpy buffers, tracked so that every access can be bounds-checked -------------

_allocs: dict[int, tuple[int, weakref.ref]] = {}    # start address -> (end address, owner)
_starts: list[int] = []                             # sorted keys of _allocs
_prune_at = 4096


_live = [0, 0]          # bytes of live device buffers, and their high-water mark (the pool's total)


def _freed(nbytes: int):
    _live[0] -= nbytes


def _register(buf: np.ndarray) -> None:
    global _prune_at
    start = buf.__array_interface__["data"][0]
    if start not in _allocs:
        bisect.insort(_starts, start)
    _allocs[start] = (start + buf.nbytes, weakref.ref(buf))
    weakref.finalize(buf, _freed, buf.nbytes)
    _live[0] += buf.nbytes
    _live[1] = max(_live[1], _live[0])
    if len(_starts) > _prune_at:                    # forget freed buffers now and then
        for s in [s for s, (_, ref) in _allocs.items() if ref() is None]:
            del _allocs[s]
        _starts[:] = sorted(_allocs)
        _prune_at = max(4096, 2 * len(_starts))


def check_range(ptr: int, nbytes: int) -> None:
    """Assert that [ptr, ptr + nbytes) lies inside one live device allocation."""
    i = bisect.bisect_right(_starts, ptr) - 1
    while i >= 0:                                    # live allocations never overlap: the nearest
        end, ref = _allocs[_starts[i]]               # live one at or below ptr decides
        if ref() is not None:
            if ptr + nbytes <= end:
                return
            break
        i -= 1
    raise AssertionError(f"out-of-bounds device access: [{ptr:#x}, +{nbytes}) is in no live allocation")


def mem(ptr: int, n: int, dt) -> np.ndarray:
    """n elements of dtype dt at device address ptr, as a writable numpy view (bounds-checked)."""
    dt = np.dtype(dt)
    if n == 0:
        return np.zeros(0, dt)
    check_range(ptr, n * dt.itemsize)
    return np.frombuffer((ctypes.c_char * (n * dt.itemsize)).from_address(ptr), dt)


class _MemoryPointer:
    def __init__(self, arr: "ndarray"):
        self.ptr = arr.__array_interface__["data"][0]

    def copy_from_host_async(self, src, size, stream=None):
        """src: a ctypes.c_void_p to host memory, as CuPy requires. During a capture the copy
        becomes a graph node that reads the host memory when the graph is launched."""
        check_range(self.ptr, size)
        s = stream or get_current_stream()
        if _capturing is not None:
            assert s is _capturing, "a host-to-device copy on another stream while a stream captures"
            _capturing.nodes.append(("copy", self.ptr, src.value, size))
            return
        _host_copy(self.ptr, src.value, size)


def _host_copy(dst: int, src: int, size: int) -> None:
    check_range(dst, size)
    _copies.issue(src, size)
    ctypes.memmove(dst, src, size)


class ndarray(np.ndarray):
    """A device array: numpy semantics, plus .data.ptr and .get() as in CuPy."""

    @property
    def data(self):
        return _MemoryPointer(self)

    def get(self):
        return asnumpy(self)

    def __array_finalize__(self, obj):
        # numpy operations on device arrays make new device buffers: track them too.
        b = self
        while isinstance(b.base, np.ndarray):
            b = b.base
        if b.base is None and b.nbytes:
            ent = _allocs.get(b.__array_interface__["data"][0])
            if ent is None or ent[1]() is not b:
                _no_capture("a device array computed with numpy operations")
                _register(b)


def _device(host: np.ndarray) -> ndarray:
    _no_capture("cupy.asarray / a device copy")
    b = np.empty(host.shape, host.dtype)
    b[...] = host
    _register(b)
    return b.view(ndarray)


def empty(shape, dtype=np.float32):
    _no_capture("cupy.empty")
    b = np.empty(shape, dtype)
    b.view(np.uint8).reshape(-1)[...] = 0xFF          # poison: NaN as floats, -1 as integers
    _register(b)
    return b.view(ndarray)


def zeros(shape, dtype=np.float32):
    _no_capture("cupy.zeros")
    b = np.zeros(shape, dtype)
    _register(b)
    return b.view(ndarray)


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _device(np.asarray(a, dtype))


def ascontiguousarray(a):
    return a if isinstance(a, ndarray) and a.flags.c_contiguous else _device(np.asarray(a))


def asnumpy(a):
    _no_capture("a device-to-host copy (.get() / asnumpy)")
    _copies.synchronize()                             # a device-to-host copy waits for the stream
    return np.array(np.asarray(a))


class _MemoryPool:
    """CuPy's pool: used = live buffers; total = what it holds, live or cached for reuse, which
    (as CuPy's, barring fragmentation) is the high-water mark of used since free_all_blocks."""

    def used_bytes(self):
        return sum(end - start for start, (end, ref) in _allocs.items() if ref() is not None)

    def total_bytes(self):
        return max(_live[1], self.used_bytes())

    def free_all_blocks(self):
        _live[1] = _live[0]


_pool = _MemoryPool()


def get_default_memory_pool():
    return _pool


# ---- the cuda namespace: one fake device, one stream ------------------------------------------------

class _Event:
    def __init__(self, seq: int):
        self.seq = seq

    def synchronize(self):
        _no_capture("Event.synchronize")
        _copies.wait(self.seq)


class _Copies:
    """Copies run at once, but the device remembers the host source ranges of copies not yet
    waited on (by an event recorded after them, or a device-to-host copy): copying from such a
    range again means the host rewrote a buffer that an in-flight copy may still be reading.
    (Streams run serially here, so one record serves every stream.)"""

    def __init__(self):
        self.seq = 0
        self.pending: dict[int, tuple[int, int]] = {}   # copy number -> source [lo, hi)

    def issue(self, src: int, size: int):
        for lo, hi in self.pending.values():
            assert src + size <= lo or hi <= src, \
                f"host buffer [{src:#x}, +{size}) reused before the copy that read it was waited on"
        self.seq += 1
        self.pending[self.seq] = (src, src + size)

    def wait(self, seq: int):
        self.pending = {s: r for s, r in self.pending.items() if s > seq}

    def synchronize(self):
        self.pending.clear()


_copies = _Copies()
_capturing: "Stream | None" = None                 # the stream now capturing, if any
STATS = {"launches": 0, "emu_seconds": 0.0}        # kernels run (eager or replayed); time in _emu


def _no_capture(what: str) -> None:
    if _capturing is not None:
        raise AssertionError(f"{what} during CUDA graph capture: allocate every buffer the graph uses "
                             f"and copy every input before begin_capture()")


class Stream:
    """cupy.cuda.Stream: a context manager that makes itself the current stream, and CUDA
    graph capture (CuPy's relaxed mode). Work runs at once, in issue order, on every stream."""

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int | None = None):
        self.ptr = 0 if null else id(self)
        self.nodes: list[tuple] = []

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.remove(self)

    def record(self, event=None):
        assert _capturing is None, "Stream.record during capture: tinyllm records no events in graphs"
        return _Event(_copies.seq)

    def synchronize(self):
        _no_capture("Stream.synchronize")
        _copies.synchronize()

    def begin_capture(self, mode=None):
        global _capturing
        assert self.ptr != 0, "the legacy default stream cannot capture: capture on a cupy.cuda.Stream()"
        assert _capturing is None, "a stream is already capturing"
        assert _current[-1] is self, "capture on the current stream (use `with stream:`)"
        self.nodes = []
        _capturing = self

    def is_capturing(self) -> bool:
        return _capturing is self

    def end_capture(self) -> "Graph":
        global _capturing
        assert _capturing is self, "end_capture on a stream that is not capturing"
        _capturing = None
        g, self.nodes = Graph(self.nodes), []
        return g


class Graph:
    """cupy.cuda.graph.Graph: what a capture recorded, replayed in order by launch()."""

    def __init__(self, nodes: list[tuple]):
        self.nodes = nodes

    def upload(self, stream=None):
        pass

    def launch(self, stream=None):
        """Replays the nodes; all of it counts as device time in STATS["emu_seconds"] (a real
        graph launch is one driver call; the device then runs the nodes)."""
        _no_capture("Graph.launch")
        t0, e0 = time.perf_counter(), STATS["emu_seconds"]
        for node in self.nodes:
            if node[0] == "kernel":
                _execute(*node[1:])
            else:
                _host_copy(*node[1:])
        STATS["emu_seconds"] = e0 + time.perf_counter() - t0


_stream = Stream(null=True)                          # the legacy default stream
_current: list[Stream] = [_stream]


def get_current_stream() -> Stream:
    return _current[-1]


class _Runtime:
    @staticmethod
    def getDeviceProperties(i):
        return {"major": 9, "minor": 0, "name": b"FakeCuPy H100", "multiProcessorCount": 132,
                "sharedMemPerBlockOptin": 232448}

    @staticmethod
    def memGetInfo():
        return (70 << 30, 80 << 30)


class OutOfMemoryError(Exception):
    pass


class _Device:
    def __init__(self, i=0):
        self.id = i

    def use(self):
        pass


def _alloc_pinned_memory(n):
    return np.zeros(n, np.uint8)


cuda = types.SimpleNamespace(
    runtime=_Runtime, is_available=lambda: True, Device=_Device, get_current_stream=get_current_stream,
    Stream=Stream, graph=types.SimpleNamespace(Graph=Graph),
    alloc_pinned_memory=_alloc_pinned_memory, memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
    device=types.SimpleNamespace(get_cublas_handle=lambda: 0))

# ---- kernels --------------------------------------------------------------------------------------

# C parameter types -> numpy scalar type (scalars) / accepted dtypes and alignment (pointees).
# kv_t is the cache storage type of the module's KV_KIND; the raw vector types of the gather
# kernels take any dtype.
_SCALARS = {"int": np.int32, "unsigned int": np.uint32, "long long": np.int64,
            "unsigned long long": np.uint64, "float": np.float32}
_BF16 = ("bfloat16", "uint16")
_POINTEES = {"bf16": (_BF16, 2), "__nv_bfloat16": (_BF16, 2), "__half": (("float16",), 2), "float": (("float32",), 4),
             "int": (("int32",), 4), "unsigned long long": (("uint64",), 8),
             "uint4": (None, 16), "unsigned int": (None, 4), "unsigned short": (None, 2), "unsigned char": (None, 1)}
_KV_DTYPES = {0: _BF16, 1: ("float16",), 2: ("float32",), 3: ("int8",), 4: ("uint8",)}
_KV_SIZES = {0: 2, 1: 2, 2: 4, 3: 1, 4: 1}


def _param_type(param: str):
    """'const bf16 *q' -> ('ptr', 'bf16'); 'int ldq' -> ('scalar', np.int32)."""
    words = param.replace("*", " * ").replace("__restrict__", " ").split()
    words = [w for w in words if w not in ("const", "volatile")]
    if "*" in words:
        return "ptr", " ".join(words[:words.index("*")])
    return "scalar", _SCALARS[" ".join(words[:-1])]


class RawModule:
    def __init__(self, code=None, *, options=()):
        assert isinstance(code, str) and isinstance(options, tuple)
        assert not any(o.startswith(("-arch", "--gpu-architecture")) for o in options), "CuPy adds -arch itself"
        self.code, self.options = code, options

    def get_function(self, name):
        entries = entry_points(self.code, self.options)
        assert name in entries, f"{name} is not an extern \"C\" kernel of this module (it has {sorted(entries)})"
        defines = dict(o[2:].split("=", 1) for o in self.options if o.startswith("-D"))
        return RawKernel(name, *entries[name], defines, self.code, self.options)


# (kernel, KV_KIND define or None) -> [launches, {"grid x block (+smem)", ...}]
LAUNCHED: dict[tuple[str, str | None], list] = {}


@atexit.register
def _write_launch_log():
    """FAKECUPY_LAUNCH_LOG: [[kernel, KV_KIND, launches, [launch geometries]], ...]."""
    path = os.environ.get("FAKECUPY_LAUNCH_LOG")
    if path:
        with open(path, "w") as f:
            json.dump([[k, kind, n, sorted(geoms)] for (k, kind), (n, geoms) in sorted(LAUNCHED.items(), key=str)], f)


class RawKernel:
    def __init__(self, name, max_threads, params, defines, code="", options=()):
        self.name, self.max_threads, self.params, self.defines = name, max_threads, params, defines
        self.code, self.options = code, options
        self.types = [_param_type(p) for p in params]
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def _pointer(self, a, param, pointee):
        if isinstance(a, np.uint64):
            assert int(a) == 0, f"{self.name}: integer {int(a)} for pointer {param} (only 0 = null)"
            return None
        assert isinstance(a, ndarray), f"{self.name}: {type(a).__name__} for pointer {param}"
        if pointee == "kv_t":
            kind = int(self.defines["KV_KIND"])
            dtypes, align = _KV_DTYPES[kind], _KV_SIZES[kind]
        else:
            assert pointee in _POINTEES, f"{self.name}: unknown pointee type in {param}"
            dtypes, align = _POINTEES[pointee]
        assert dtypes is None or a.dtype.name in dtypes, f"{self.name}: {a.dtype} array for {param}"
        assert a.data.ptr % align == 0, f"{self.name}: {param} = {a.data.ptr:#x} is not {align}-byte aligned"
        return a

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} args for {len(self.params)} params"
        conv = []
        for a, p, (kind, t) in zip(args, self.params, self.types):
            if kind == "ptr":
                conv.append(self._pointer(a, p, t))
            else:
                assert type(a) is t, f"{self.name}: {type(a).__name__} for {p}"
                conv.append(a.item())
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        assert min(grid) >= 1 and min(block) >= 1, f"{self.name}: empty launch grid {grid} block {block}"
        assert max(grid[1:]) <= 65535, f"{self.name}: grid {grid} exceeds 65535 in y or z"
        threads = block[0] * block[1] * block[2]
        assert threads <= self.max_threads, f"{self.name}: {threads} threads > launch bounds {self.max_threads}"
        assert shared_mem <= self.max_dynamic_shared_size_bytes, \
            f"{self.name}: {shared_mem} B of dynamic shared memory, {self.max_dynamic_shared_size_bytes} enabled"
        entry = LAUNCHED.setdefault((self.name, self.defines.get("KV_KIND")), [0, set()])
        entry[0] += 1
        entry[1].add(f"{grid[0]}x{grid[1]}x{grid[2]} * {threads}" + (f" +{shared_mem} B" if shared_mem else ""))
        _submit(self, grid, block, conv, shared_mem, stream)


class _Address:
    """A device pointer as a captured graph holds it: the bare address (read by _emu's P()),
    keeping no array alive."""
    __slots__ = ("__array_interface__",)

    def __init__(self, ptr: int):
        self.__array_interface__ = {"data": (ptr, False)}


def _submit(kernel: RawKernel, grid: tuple, block: tuple, args: list, shared_mem: int, stream=None) -> None:
    """Where every checked launch goes. args: per parameter, an ndarray (a pointer), None (a
    null pointer) or a Python int/float (a scalar, already type-checked). While a stream
    captures, the launch is recorded with its arguments as of now (pointers as bare
    addresses); otherwise it runs."""
    s = stream or get_current_stream()
    if _capturing is not None:
        assert s is _capturing, f"{kernel.name} launched on another stream while a stream captures"
        raw = [_Address(a.__array_interface__["data"][0]) if isinstance(a, np.ndarray) else a for a in args]
        _capturing.nodes.append(("kernel", kernel, grid, block, raw, shared_mem))
        return
    _execute(kernel, grid, block, args, shared_mem)


def _execute(kernel: RawKernel, grid: tuple, block: tuple, args: list, shared_mem: int) -> None:
    """Run one launch (eager, or a graph node being replayed): the real kernel on the CPU
    executor (_cpu.py), or with FAKECUPY_KERNELS=emu its numpy emulation (_emu.py)."""
    t0 = time.perf_counter()
    if KERNELS == "emu":
        _emu.run(kernel.name, grid, block, args, kernel.defines)
    else:
        _cpu.run(kernel, grid, block, args, shared_mem)
    STATS["launches"] += 1
    STATS["emu_seconds"] += time.perf_counter() - t0


# cudacpu: the real kernels on the CPU executor (default); emu: their numpy emulation.
KERNELS = os.environ.get("FAKECUPY_KERNELS", "cudacpu")
assert KERNELS in ("cudacpu", "emu"), f"FAKECUPY_KERNELS={KERNELS!r}: use cudacpu or emu"
from . import _emu  # noqa: E402  (it reads device memory through mem() above)
from . import _cpu  # noqa: E402
