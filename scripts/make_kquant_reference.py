"""Blocks llama.cpp's own reference quantizers wrote, as a test fixture (issue 20).

tests/test_quant.py checks that tinyllm.quant.quantize produces these bytes exactly. The
fixture is made by compiling llama.cpp's ggml-quants.c (from the llama-cpp-python sdist on
PyPI, which vendors llama.cpp's C sources) into a temporary shared library and calling its
quantize_row_{q8_0,q4_0,q4_1,q4_K,q6_K}_ref through ctypes on deterministic inputs. No
llama.cpp code enters this repository: the C is compiled in a temp directory and thrown away;
only the inputs and the blocks it wrote are kept.

How the committed tests/data/llamacpp_kquant_blocks.npz was made (2026-12-03):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    python scripts/make_kquant_reference.py --sdist /tmp/lcp/llama_cpp_python-0.3.36.tar.gz

    llama-cpp-python 0.3.36 (vendor/llama.cpp/ggml/src/ggml-quants.c), gcc 12.2.0 (Debian),
    x86-64: gcc -O2 -std=gnu11 -fPIC -shared -DNDEBUG -ffp-contract=off ggml-quants.c stubs.c -lm
    (-DNDEBUG as llama.cpp's release builds; -ffp-contract=off so that no multiply-add is fused,
    which plain x86-64 code cannot fuse anyway; stubs.c defines the four ggml functions the
    file links against but the _ref quantizers never call.)

Without --sdist the script runs the pip download above into a temp directory.

The .npz holds, per case name C: `C.x` float32 (rows, K) inputs, `C.<fmt>` uint8 blocks as a
GGUF stores them (rows, K / block * block_bytes), and `recipe` (one line per case: how its
inputs were drawn, seed included). Inputs are stored, not regenerated, so the fixture does not
depend on numpy's generators staying the same.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "llamacpp_kquant_blocks.npz"
CFLAGS = ["-O2", "-std=gnu11", "-fPIC", "-shared", "-DNDEBUG", "-ffp-contract=off"]
# fmt -> (llama.cpp function, elements per block, bytes per block)
FUNCS = {
    "q8_0": ("quantize_row_q8_0_ref", 32, 34),
    "q4_0": ("quantize_row_q4_0_ref", 32, 18),
    "q4_1": ("quantize_row_q4_1_ref", 32, 20),
    "q4_k": ("quantize_row_q4_K_ref", 256, 144),
    "q6_k": ("quantize_row_q6_K_ref", 256, 210),
}
# The symbols ggml-quants.c links against outside itself; the _ref quantizers call none of them.
STUBS = """
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "ggml_abort %s:%d\\n", file, line); abort(); }
size_t ggml_row_size(int type, long long ne) { abort(); }
const char *ggml_type_name(int type) { abort(); }
size_t ggml_type_size(int type) { abort(); }
"""


def cases() -> list[tuple[str, str, np.ndarray]]:
    """(name, recipe, float32 (rows, 512)) inputs that stress the scale searches."""
    out = []

    def add(name, seed, recipe, make):
        rng = np.random.default_rng(seed)
        out.append((name, f"{name}: seed {seed}: {recipe}", np.asarray(make(rng), np.float32)))

    shape = (3, 512)
    add("normal", 1, "N(0,1)*0.02, (8,512)", lambda r: r.standard_normal((8, 512)) * 0.02)
    add("bf16", 2, "N(0,1)*0.05 rounded to bf16", lambda r: _bf16(r.standard_normal(shape) * 0.05))
    add("student_t", 3, "student-t df=2 * 0.01", lambda r: r.standard_t(2, shape) * 0.01)
    add("outliers", 4, "N*0.02, 1% of entries x50", lambda r: _outliers(r, shape))
    add("zero", 0, "all zero", lambda r: np.zeros(shape))
    add("const_pos", 0, "all 0.3", lambda r: np.full(shape, 0.3))
    add("const_neg", 0, "all -0.7", lambda r: np.full(shape, -0.7))
    add("tiny", 5, "N*1e-6", lambda r: r.standard_normal(shape) * 1e-6)
    add("tinier", 6, "N*1e-9 (fp16 scales underflow)", lambda r: r.standard_normal(shape) * 1e-9)
    add("large", 7, "N*300", lambda r: r.standard_normal(shape) * 300)
    add("positive", 8, "U(0,1)", lambda r: r.uniform(0, 1, shape))
    add("negative", 9, "-U(0.5,1)", lambda r: -r.uniform(0.5, 1, shape))
    add("mixed_sign", 10, "blocks of 32 alternately |N| and -|N|", lambda r: _mixed(r, shape))
    add("huge_one", 11, "N*0.02 + one 1000 per 32-block", lambda r: _huge_one(r, shape))
    add("sub_scales", 12, "N * 10^U(-4,1) per 32-block", lambda r: _sub_scales(r, shape))
    add(
        "sparse",
        13,
        "N, 95% set to zero",
        lambda r: r.standard_normal(shape) * (r.random(shape) > 0.95),
    )
    add(
        "q4_1_grid",
        14,
        "integers 0..15 * 0.01 - 0.07 (a 4-bit grid)",
        lambda r: r.integers(0, 16, shape) * 0.01 - 0.07,
    )
    add(
        "ties",
        0,
        "arange(512)/16 - 16 per row (rounding ties)",
        lambda r: np.tile(np.arange(512) / 16 - 16, (3, 1)),
    )
    return out


def _bf16(x):
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)


def _outliers(r, shape):
    x = r.standard_normal(shape) * 0.02
    return np.where(r.random(shape) < 0.01, x * 50, x)


def _mixed(r, shape):
    x = np.abs(r.standard_normal(shape)).reshape(shape[0], -1, 32)
    x[:, 1::2] *= -1
    return x.reshape(shape)


def _huge_one(r, shape):
    x = (r.standard_normal(shape) * 0.02).reshape(-1, 32)
    x[np.arange(len(x)), r.integers(0, 32, len(x))] = 1000.0
    return x.reshape(shape)


def _sub_scales(r, shape):
    x = r.standard_normal(shape).reshape(-1, 32)
    return (x * 10.0 ** r.uniform(-4, 1, (len(x), 1))).reshape(shape)


def build_library(sdist: Path, tmp: Path) -> ctypes.CDLL:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/ggml/" in m.name]
        tar.extractall(tmp, members=members, filter="data")
    ggml = next(tmp.glob("*/vendor/llama.cpp/ggml"))
    (tmp / "stubs.c").write_text(STUBS)
    lib = tmp / "ggml_quants_ref.so"
    cmd = ["gcc", *CFLAGS, f"-I{ggml / 'include'}", f"-I{ggml / 'src'}"]
    cmd += [str(ggml / "src" / "ggml-quants.c"), str(tmp / "stubs.c"), "-o", str(lib), "-lm"]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def quantize_with(lib: ctypes.CDLL, fmt: str, x: np.ndarray) -> np.ndarray:
    name, block, nbytes = FUNCS[fmt]
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block * nbytes), np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)  # blocks are independent: all rows in one call
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sdist", type=Path, help=f"llama_cpp_python-{VERSION}.tar.gz (else pip download)"
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sdist = args.sdist
        if sdist is None:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*pip, f"llama-cpp-python=={VERSION}", "-d", str(tmp)], check=True)
            sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        lib = build_library(sdist, tmp)
        arrays, recipes = {}, []
        for name, recipe, x in cases():
            recipes.append(recipe)
            arrays[f"{name}.x"] = x
            for fmt in FUNCS:
                arrays[f"{name}.{fmt}"] = quantize_with(lib, fmt, x)
    arrays["recipe"] = np.array("\n".join(recipes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {len(recipes)} cases, {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
