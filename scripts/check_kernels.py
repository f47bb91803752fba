#!/usr/bin/env python3
"""Compile-check every cuda/*.cu without a GPU (CI runs this).

1. The gate: NVRTC (cuda.bindings.nvrtc, from the pip wheels nvidia-cuda-nvrtc + cuda-bindings)
   compiles the exact source string and options tinyllm/backends/cuda_kernels.py hands CuPy at
   run time, plus the options CuPy adds itself (-arch=sm_90 -ftz=true
   --device-as-default-execution-space -I<CUDA include>), for every variant (one per KV-cache
   kind for the attention / cache-write files). Any error or warning fails, and so does a
   register spill or local-memory use reported by ptxas.
2. The lint: nvcc -arch=sm_90 -std=c++17 -cubin -Werror all-warnings
   -Xptxas -v,-warn-spills,-warn-lmem-usage,-Werror on the same inlined source.
3. Prints registers / shared memory / stack per kernel (from ptxas -v), so a diff shows when a
   kernel starts spilling or grows.

Exit status 0 only if everything compiled cleanly. A missing NVRTC or nvcc is a failure unless
--allow-missing is given (then that stage prints "skipped: ..." and is not counted).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinyllm.backends import cuda_kernels as ck  # noqa: E402

ARCH = "90"
PTXAS_FLAGS = ("-v", "-warn-spills", "-warn-lmem-usage")


# ---- toolchain discovery ------------------------------------------------------------------


def cuda_include_dirs() -> list[str]:
    """Where CuPy finds CUDA's headers: cuda.pathfinder, else CUDA_PATH / the toolkit."""
    dirs: list[str] = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        d = find_nvidia_header_directory("cudart")
        if d:
            dirs.append(str(d))
    except Exception:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            dirs.append(str(Path(root) / "include"))
    nvcc = find_nvcc()
    if nvcc:
        inc = Path(nvcc).resolve().parent.parent / "include"
        if (inc / "cuda_bf16.h").is_file():
            dirs.append(str(inc))
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
        cccl = Path(d) / "cccl"
        if cccl.is_dir() and str(cccl) not in out:
            out.append(str(cccl))
    return out


def find_nvcc() -> str | None:
    for c in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and Path(c).is_file():
            return c
    return None


# ---- ptxas -v parsing -----------------------------------------------------------------------

_FN = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_][\w]*)'?")
_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?(?:,|$)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_resources(log: str) -> dict[str, dict]:
    res: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _FN.search(line)
        if m:
            cur = m.group(1)
            res.setdefault(cur, {})
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            res[cur].update(
                stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3))
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            res[cur]["smem"] = int(s.group(1)) if s else 0
    return res


def problems(log: str) -> list[str]:
    """Lines of a compiler log that fail the check."""
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if "warning" in low or "error" in low:
            bad.append(line.strip())
    return bad


# ---- stage 1: NVRTC ----------------------------------------------------------------------------


def nvrtc_available() -> str | None:
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
        return f"NVRTC {major}.{minor}" if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else None
    except Exception:
        return None


def nvrtc_options(extra: dict, includes: list[str]) -> list[str]:
    opts = list(ck.options(extra))
    opts += [f"-arch=sm_{ARCH}", "-ftz=true", "--device-as-default-execution-space"]
    opts += [f"-I{d}" for d in includes]
    for f in PTXAS_FLAGS:  # NVRTC: one ptxas flag per -Xptxas
        opts += ["-Xptxas", f]
    return opts


def compile_nvrtc(filename: str, extra: dict, includes: list[str]) -> tuple[bool, str]:
    from cuda.bindings import nvrtc

    src = ck.source(filename).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, filename.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return False, f"nvrtcCreateProgram: {err}"
    try:
        opts = [o.encode() for o in nvrtc_options(extra, includes)]
        (cerr,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace").rstrip("\x00").strip()
        ok = cerr == nvrtc.nvrtcResult.NVRTC_SUCCESS
        return ok, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---- stage 2: nvcc -----------------------------------------------------------------------------


def compile_nvcc(nvcc: str, filename: str, extra: dict, tmp: Path) -> tuple[bool, str]:
    tag = filename.replace(".cu", "") + "".join(f"_{k}{v}" for k, v in sorted(extra.items()))
    src = tmp / f"{tag}.cu"
    src.write_text(ck.source(filename))
    cmd = [
        nvcc,
        f"-arch=sm_{ARCH}",
        "-std=c++17",
        "-cubin",
        "-o",
        str(tmp / f"{tag}.cubin"),
        "-Werror",
        "all-warnings",
        "-Xptxas",
        ",".join(PTXAS_FLAGS + ("-Werror",)),
        *[o for o in ck.options(extra) if o.startswith("-D")],
        str(src),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--allow-missing",
        action="store_true",
        help="a missing NVRTC or nvcc skips that stage instead of failing",
    )
    ap.add_argument(
        "--only", action="append", default=[], help="check only this cuda/ file (repeatable)"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no resource table")
    args = ap.parse_args(argv)

    files = args.only or ck.kernel_files()
    builds = [(f, v) for f in files for v in ck.variants(f)]
    failures: list[str] = []
    resources: dict[str, dict] = {}
    print(f"cuda dir: {ck.CUDA_DIR}  ({len(files)} files, {len(builds)} builds)")

    # Stage 1: NVRTC (the gate).
    have = nvrtc_available()
    includes = cuda_include_dirs()
    if not have:
        msg = "NVRTC not importable (pip install 'nvidia-cuda-nvrtc==13.0.*' cuda-bindings)"
        if args.allow_missing:
            print(f"nvrtc: skipped: {msg}")
        else:
            failures.append(f"nvrtc: {msg}")
    elif not includes:
        failures.append("nvrtc: no CUDA include directory (cuda_bf16.h) found")
    else:
        print(f"nvrtc: {have}, includes {includes}")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
            results = list(ex.map(lambda b: (b, compile_nvrtc(b[0], b[1], includes)), builds))
        for (f, v), (ok, log) in results:
            tag = f + (f" {v}" if v else "")
            bad = problems(log)
            for name, r in parse_resources(log).items():
                resources[name + (f" [KV_KIND={v['KV_KIND']}]" if v else "")] = r
                if r.get("spill_st") or r.get("spill_ld") or r.get("stack"):
                    bad.append(
                        f"{name}: {r.get('stack', 0)} B stack, "
                        f"{r.get('spill_st', 0)}/{r.get('spill_ld', 0)} B spill st/ld"
                    )
            if not ok or bad:
                failures.append(
                    f"nvrtc {tag}:\n    "
                    + "\n    ".join(bad or log.splitlines() or ["compile failed"])
                )
            print(f"  nvrtc {'ok  ' if ok and not bad else 'FAIL'} {tag}")

    # Stage 2: nvcc (the lint).
    nvcc = find_nvcc()
    if not nvcc:
        msg = "nvcc not found (PATH or /usr/local/cuda/bin)"
        if args.allow_missing:
            print(f"nvcc: skipped: {msg}")
        else:
            failures.append(f"nvcc: {msg}")
    else:
        print(f"nvcc: {nvcc}")
        with tempfile.TemporaryDirectory() as d:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
                results = list(
                    ex.map(lambda b: (b, compile_nvcc(nvcc, b[0], b[1], Path(d))), builds)
                )
        for (f, v), (ok, log) in results:
            tag = f + (f" {v}" if v else "")
            if not ok:
                failures.append(
                    f"nvcc {tag}:\n    "
                    + "\n    ".join(
                        [
                            line
                            for line in log.splitlines()
                            if "ptxas info" not in line and not line.startswith("    ")
                        ][:40]
                    )
                )
            if not resources:  # NVRTC skipped: take the table from nvcc
                for name, r in parse_resources(log).items():
                    resources[name + (f" [KV_KIND={v['KV_KIND']}]" if v else "")] = r
            print(f"  nvcc  {'ok  ' if ok else 'FAIL'} {tag}")

    if resources and not args.quiet:
        print(f"\n{'kernel':<58} {'regs':>5} {'smem B':>7} {'stack':>6} {'spill':>6}")
        for name in sorted(resources):
            r = resources[name]
            print(
                f"{name:<58} {r.get('regs', '?'):>5} {r.get('smem', 0):>7} {r.get('stack', 0):>6} "
                f"{r.get('spill_st', 0) + r.get('spill_ld', 0):>6}"
            )
        print(
            "(smem: static only; prefill v2 adds "
            + ", ".join(f"{ck.prefill_v2_smem(h)} B at HD={h}" for h in ck.HEAD_DIMS)
            + " dynamic)"
        )

    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print("\nall kernels compiled cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
