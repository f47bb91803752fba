"""Run tinyllm's CUDA C++ on the CPU: compile a kernel module's exact source and -D options
(what tinyllm/backends/cuda_kernels.py hands to CuPy) with the host C++ compiler against
cudacpu.h, load it with ctypes, and launch its extern "C" entry points.

The source goes through two mechanical rewrites, nothing else (see rewrite()):
  * `__shared__ T a[N], b[M];`  ->  static storage registered with the runtime, which fills it
    with 0xFF bytes at the start of every block; `extern __shared__ T buf[];` -> the launch's
    dynamic shared buffer;
  * `asm volatile("<ptx>" : outputs : inputs);`  ->  a call to the emulation of that PTX
    instruction in cudacpu.h (an instruction it does not know fails the build here).
CUDA's own bf16/fp16/fp8 headers come from the toolkit (CUDA_HOME, or nvcc's directory).

CUDACPU_DEBUG=1 builds with -O0 -g: run a test under gdb and `break flash_prefill_mma<64, 0>`
(or any kernel function); each thread is a fiber, so `bt` shows one thread's kernel stack and
`p threadIdx` / `p blockIdx` where it stands.

Compiled modules are cached by a hash of the rewritten source, cudacpu.h, the options and
the compiler's version, in $CUDACPU_CACHE (default ~/.cache/tinyllm-cudacpu).

Build modes: CUDACPU_SANITIZE=1 compiles with AddressSanitizer + UBSan's alignment check
(-fsanitize=address,alignment): out-of-bounds global and shared accesses and misaligned vector
loads then abort with a report naming the kernel. The process must have libasan loaded first
(LD_PRELOAD, see asan_env()); tests/test_cuda_host.py runs the GPU tests that way.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cudacpu.h"
sys.path.insert(0, str(HERE.parent / "fakecupy"))
from cuda_entry_points import entry_points  # noqa: E402  (shared with the CuPy stand-in)

PTX_KNOWN = (
    "ld.global.nc.L1::no_allocate.v4.u32",
    "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
)


def sanitize() -> bool:
    return os.environ.get("CUDACPU_SANITIZE") == "1"


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (for cuda_bf16.h / cuda_fp16.h / cuda_fp8.h)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for r in roots:
        if r and (Path(r) / "include" / "cuda_fp8.h").is_file():
            return Path(r) / "include"
    return None


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def available() -> str | None:
    """None when the executor can run here, else why not."""
    if compiler() is None:
        return "no host C++ compiler (g++ or clang++)"
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_fp8.h; set CUDA_HOME)"
    return None


def asan_env() -> dict:
    """Environment additions for a process that loads sanitized modules."""
    lib = subprocess.run(
        [compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "LD_PRELOAD": lib,
        "CUDACPU_SANITIZE": "1",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1:"
        "allocator_may_return_null=1:detect_stack_use_after_return=0:print_summary=1",
    }


# ---- source rewriting ----------------------------------------------------------------------------


def _matching(text: str, i: int) -> int:
    """Index just past the bracket closing the one at text[i], skipping string literals."""
    depth, j = 0, i
    pairs = {"(": ")", "[": "]", "{": "}"}
    closing = set(pairs.values())
    while j < len(text):
        c = text[j]
        if c == '"':
            j += 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
        elif c in pairs:
            depth += 1
        elif c in closing:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError("unbalanced brackets")


def _split_top(text: str, sep: str) -> list[str]:
    """Split at `sep` outside brackets and string literals."""
    out, depth, cur, j = [], 0, [], 0
    while j < len(text):
        c = text[j]
        if c == '"':
            k = j + 1
            while text[k] != '"':
                k += 2 if text[k] == "\\" else 1
            cur.append(text[j : k + 1])
            j = k + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        j += 1
    out.append("".join(cur))
    return out


_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")
_OPERAND = re.compile(r'^\s*"([=+]?)([a-z])"\s*\((.*)\)\s*$', re.S)


def _rewrite_asm(text: str) -> str:
    out, pos = [], 0
    for m in _ASM.finditer(text):
        if m.start() < pos:
            continue
        end = _matching(text, m.end() - 1)
        parts = _split_top(text[m.end() : end - 1], ":")
        template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', parts[0]))
        opcode = template.split()[0]
        if opcode not in PTX_KNOWN:
            raise ValueError(
                f"PTX instruction {opcode!r} is not emulated by tests/cudacpu/cudacpu.h"
            )
        ops = []
        for section, is_out in (
            (parts[1] if len(parts) > 1 else "", True),
            (parts[2] if len(parts) > 2 else "", False),
        ):
            for operand in filter(str.strip, _split_top(section, ",")):
                om = _OPERAND.match(operand)
                if not om:
                    raise ValueError(f"cannot read asm operand {operand!r}")
                mode, cons, expr = om.groups()
                if is_out:
                    ops.append(f"::cudacpu::out('{mode}', '{cons}', &({expr}))")
                else:
                    ops.append(f"::cudacpu::in('{cons}', ({expr}))")
        out.append(text[pos : m.start()])
        out.append(
            f'{{ static const ::cudacpu::PtxFn _ptx = ::cudacpu::ptx_find("{template}"); '
            f"::cudacpu::ptx_call(_ptx, {{{', '.join(ops)}}}); }}"
        )
        pos = end
        while text[pos].isspace():
            pos += 1
        assert text[pos] == ";", "asm statement not followed by ';'"
        pos += 1
    out.append(text[pos:])
    return "".join(out)


_SHARED = re.compile(r"(\bextern\s+)?__shared__\s+([^;]*);")


def _rewrite_shared(text: str) -> str:
    def repl(m: re.Match) -> str:
        am = re.search(r"__align__\s*\(\s*(\d+)\s*\)", m.group(2))
        align = f"alignas({am.group(1)}) " if am else ""
        decl = re.sub(r"__align__\s*\(\s*\d+\s*\)", "", m.group(2)).strip()
        if m.group(1):  # extern __shared__ T name[];
            dm = re.fullmatch(r"(.*?)(\w+)\s*\[\s*\]", decl, re.S)
            assert dm, f"cannot read dynamic shared declaration {decl!r}"
            typ, name = dm.group(1).strip(), dm.group(2)
            return f"{typ}* const {name} = static_cast<{typ}*>(::cudacpu::dynamic_shared());"
        parts = _split_top(decl, ",")
        first = re.match(r"(.*?)(\w+)\s*(\[.*)?$", parts[0].strip(), re.S)
        typ = first.group(1)
        names = [first.group(2)] + [re.match(r"\s*(\w+)", p).group(1) for p in parts[1:]]
        regs = " ".join(
            f"static const bool _cudacpu_shared_{n} = ::cudacpu::shared_static(&{n}, sizeof({n})); "
            f"(void)_cudacpu_shared_{n};"
            for n in names
        )
        return f"{align}static {decl}; {regs}"

    return _SHARED.sub(repl, text)


def rewrite(code: str) -> str:
    return _rewrite_shared(_rewrite_asm(code))


def _param_type(param: str) -> str:
    """'const bf16 *q' -> 'const bf16 *'; 'int ldq' -> 'int'."""
    m = re.fullmatch(r"(.*?)(\w+)", param.strip(), re.S)
    return m.group(1).strip()


def _wrappers(entries: dict) -> str:
    lines = ['\nextern "C" {']
    for name, (_, params) in entries.items():
        call = ", ".join(
            f"*reinterpret_cast<{_param_type(p)}*>(a[{i}])" for i, p in enumerate(params)
        )
        lines.append(
            f'__attribute__((visibility("default"))) int cudacpu_entry_{name}(const long long* g, '
            "void** a, "
            f'char* err, int errlen) {{ return ::cudacpu::launch("{name}", g, err, errlen, '
            f"[a]() {{ {name}({call}); }}); }}"
        )
    lines.append("}\n")
    return "\n".join(lines)


# ---- building and loading ------------------------------------------------------------------------


def _flags() -> list[str]:
    opt = ["-O0", "-g"] if os.environ.get("CUDACPU_DEBUG") == "1" else ["-O1"]
    f = [
        "-std=c++17",
        *opt,
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-w",
        "-fno-strict-aliasing",
        "-include",
        str(HEADER),
        f"-I{cuda_include()}",
    ]
    if sanitize():
        f += [
            "-fsanitize=address,alignment",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
            "-g1",
        ]
    return f


_compiler_version: str | None = None


def _cache_dir() -> Path:
    d = Path(os.environ.get("CUDACPU_CACHE") or Path.home() / ".cache" / "tinyllm-cudacpu")
    d.mkdir(parents=True, exist_ok=True)
    return d


class Module:
    """One compiled kernel module (a file and its -D options)."""

    def __init__(self, code: str, options: tuple = ()):
        global _compiler_version
        why = available()
        if why:
            raise RuntimeError(f"cudacpu: {why}")
        self.entries = entry_points(code, options)
        defines = [o for o in options if o.startswith("-D")]
        src = rewrite(code) + _wrappers(self.entries)
        if _compiler_version is None:
            _compiler_version = subprocess.run(
                [compiler(), "--version"], capture_output=True, text=True
            ).stdout
        flags = _flags() + defines
        key = hashlib.sha256(
            "\0".join([src, HEADER.read_text(), *flags, _compiler_version]).encode()
        ).hexdigest()[:24]
        so = _cache_dir() / f"{key}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory() as tmp:
                cu = Path(tmp) / "kernel.cpp"
                cu.write_text(src)
                out = Path(tmp) / "k.so"
                p = subprocess.run(
                    [compiler(), *flags, "-x", "c++", str(cu), "-o", str(out)],
                    capture_output=True,
                    text=True,
                )
                if p.returncode:
                    raise RuntimeError(f"cudacpu: compiling failed:\n{p.stderr[-4000:]}")
                tmp_so = so.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(out, tmp_so)
                os.replace(tmp_so, so)  # atomic: concurrent builders agree
        self.lib = ctypes.CDLL(str(so))
        self._fns: dict = {}

    def function(self, name: str):
        fn = self._fns.get(name)
        if fn is None:
            fn = getattr(self.lib, f"cudacpu_entry_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [
                ctypes.POINTER(ctypes.c_longlong),
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_char_p,
                ctypes.c_int,
            ]
            self._fns[name] = fn
        return fn

    def launch(
        self, name: str, grid, block, args: list, shared_mem: int = 0, order: int = 0
    ) -> None:
        """args: ctypes values (c_void_p for pointers, c_int, c_float, c_longlong, c_ulonglong), in
        the kernel's parameter order. Raises AssertionError naming the kernel on a failure."""
        grid = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        block = tuple(int(x) for x in block) + (1,) * (3 - len(block))
        geom = (ctypes.c_longlong * 8)(*grid, *block, int(shared_mem), int(order))
        ptrs = (ctypes.c_void_p * max(1, len(args)))(
            *[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args]
        )
        err = ctypes.create_string_buffer(1024)
        if self.function(name)(geom, ptrs, err, len(err)):
            raise AssertionError(f"cudacpu: {err.value.decode(errors='replace')}")

    def launch_checked(
        self,
        name: str,
        grid,
        block,
        args: list,
        shared_mem: int,
        buffers: list,
        orders: tuple = None,
    ) -> None:
        """launch() once per thread order (default ORDERS), restoring `buffers` (byte views of
        every allocation the arguments point into, with a label each) before each run; the
        runs must leave identical bytes, else a race fails the launch."""
        import numpy as np  # (lazily: .ci/run's preflight runs before the installs)

        orders = ORDERS if orders is None else orders
        if len(orders) == 1:
            return self.launch(name, grid, block, args, shared_mem, orders[0])
        saved = [b.copy() for b, _ in buffers]
        first = None
        for n, order in enumerate(orders):
            if n:
                for (b, _), s in zip(buffers, saved):
                    b[...] = s
            self.launch(name, grid, block, args, shared_mem, order)
            if n == 0:
                first = [b.copy() for b, _ in buffers]
                continue
            for (b, label), r0 in zip(buffers, first):
                if not np.array_equal(r0, b):
                    i = int(np.flatnonzero(r0 != b)[0])
                    raise AssertionError(
                        f"cudacpu: {name}: race: thread orders {orders[0]} and {order} leave "
                        "different bytes in "
                        f"{label} (first at byte {i}: {r0[i]:#04x} vs {b[i]:#04x}): a missing "
                        "__syncthreads() "
                        f"or two threads writing one place"
                    )


# Thread orders every checked launch runs in (0: thread 0 first, 1: the last thread first).
ORDERS = tuple(int(o) for o in os.environ.get("CUDACPU_ORDERS", "0,1").split(","))


if __name__ == "__main__":  # .ci/run's preflight: the executor must run in CI, not skip
    why = available()
    if why:
        sys.exit(f"cudacpu: cannot run here: {why}")
    print(f"cudacpu: {compiler()} with CUDA headers from {cuda_include()}")
