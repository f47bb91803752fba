#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests (every kernel against its numpy twin, whole-model
# parity, CUDA-graph decode vs eager), then the benchmark table (scripts/bench_gpu.py; its last
# rows are decode tok/s, % of copy bandwidth, host ms and kernels per step of a Mistral-7B-shaped
# bf16 model at batch 1, 8 and 64, eager vs CUDA graph; --graph-batches picks the batch sizes),
# then predicted vs measured time per kernel (scripts/kernel_profile.py + kernel_calibrate.py).
# Needs CuPy (cupy-cuda13x), torch and transformers; no network. Extra arguments go to
# bench_gpu.py (e.g. --layers 8 for a quick run).
# Exit status: non-zero if the tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp}

$PY - <<'PY' || { echo "gpu_check: no usable GPU through CuPy" >&2; exit 2; }
import cupy
p = cupy.cuda.runtime.getDeviceProperties(0)
name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
print(f"cupy {cupy.__version__}, {name}, cc {p['major']}.{p['minor']}, {p['multiProcessorCount']} SMs")
PY

echo "== GPU tests =="
$PY -m pytest -q -m gpu tests/test_cuda_ops.py tests/test_cuda_model.py -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark =="
$PY scripts/bench_gpu.py --json "$OUT_DIR/bench_gpu.json" "$@" 2>&1 | tee "$OUT_DIR/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "== kernel model: predicted vs measured us per kernel (scripts/kernel_profile.py) =="
# The counters come from the CPU executor (needs g++ and the CUDA headers); the timing from
# this GPU. Calibrates the model of BENCHMARKS.md "Kernel counters" the first time a GPU exists.
{ $PY scripts/kernel_profile.py --kv bf16 --kv int8 --no-prefill --json "$OUT_DIR/kernel_profile.json" &&
  $PY scripts/kernel_calibrate.py "$OUT_DIR/kernel_profile.json" --json "$OUT_DIR/kernel_calibrate.json"; } \
  2>&1 | tee "$OUT_DIR/kernel_calibrate.log"
model_rc=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc, kernel model exit $model_rc (logs in $OUT_DIR)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$model_rc" -eq 0 ]
