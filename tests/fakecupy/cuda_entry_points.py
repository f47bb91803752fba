"""The kernel entry points of a CUDA source string, without the CUDA toolkit: the extern "C"
__global__ functions, their __launch_bounds__ and parameter lists, read from the source as the
host C preprocessor (cpp, gcc -E or clang -E) expands it with the module's -D options. The
system #includes (the CUDA headers) are dropped first: no entry-point signature depends on
them. Used by the CuPy stand-in (cupy/__init__.py) to check launches, and by
tests/test_cuda_host.py to list every kernel that the GPU tests should launch."""

from __future__ import annotations

import re
import shutil
import subprocess

_KERNEL = re.compile(r'__global__\s+(void\s+)?(?:__launch_bounds__\s*\(((?:[^()]|\([^()]*\))*)\)\s*)?'
                     r'(void\s+)?(\w+)\s*\(([^)]*)\)')
_cache: dict = {}


def preprocessor() -> list[str] | None:
    for cmd in (["cpp"], ["gcc", "-E"], ["clang", "-E"]):
        if shutil.which(cmd[0]):
            return cmd
    return None


def _int_expr(s: str) -> int:
    s = s.strip()
    assert re.fullmatch(r"[\d\s()+\-*/]+", s), f"launch bounds {s!r} is not an integer expression"
    return int(eval(s.replace("/", "//")))


def _extern_c_blocks(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in re.finditer(r'extern\s+"C"\s*\{', text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        spans.append((m.end(), i))
    return spans


def entry_points(code: str, options=()) -> dict[str, tuple[int, list[str]]]:
    """{kernel name: (max threads per block, ["const bf16 *q", "int ldq", ...])}."""
    defines = tuple(o for o in options if o.startswith("-D"))
    key = (code, defines)
    if key not in _cache:
        cmd = preprocessor()
        assert cmd, "no C preprocessor (cpp, gcc or clang) to read the kernels' signatures"
        src = re.sub(r"^[ \t]*#[ \t]*include[ \t]*<[^>]*>", "", code, flags=re.M)
        p = subprocess.run(cmd + ["-P", "-x", "c++", "-std=c++17", *defines, "-"], input=src,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        text = p.stdout
        blocks = _extern_c_blocks(text)
        entries = {}
        for m in _KERNEL.finditer(text):
            assert bool(m.group(1)) != bool(m.group(3)), f"cannot parse {m.group(0)!r}"
            extern_c = any(lo <= m.start() < hi for lo, hi in blocks) or \
                re.search(r'extern\s+"C"\s*$', text[max(0, m.start() - 40):m.start()])
            if extern_c:
                bound = _int_expr(m.group(2).split(",")[0]) if m.group(2) else 1024
                entries[m.group(4)] = (bound, [" ".join(x.split()) for x in m.group(5).split(",") if x.strip()])
        _cache[key] = entries
    return _cache[key]
