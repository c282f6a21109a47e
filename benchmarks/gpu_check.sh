#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA torch but without network access:
#   1. install diffusers from wheels carried in .whl/ (if any), without touching torch;
#   2. the CUDA tests (python -m pytest -m gpu);
#   3. benchmarks/gpu_bench.py at full size (SD 1.5's architecture, 512 px, 25 steps).
# Results go to $OUT (or ./gpu-results): gpu-tests.log, gpu-bench.json, gpu-bench.log.
#
# Preparing the wheels, on a machine with PyPI (see the device tool's README for the platform flags):
#   pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata zipp
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee "$out/versions.txt" || exit 1
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu_bench.py --runs "${RUNS:-3}" ${BENCH_ARGS:-} --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
