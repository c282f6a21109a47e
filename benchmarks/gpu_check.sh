#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA torch but without network access, cheapest
# first so that a run cut short still leaves figures behind:
#   1. install diffusers from wheels carried in .whl/ (if any), without touching torch;
#   2. benchmarks/gpu_bench.py at full size (SD 1.5's architecture, 512 px, 25 steps) without --compile;
#   3. the CUDA tests (python -m pytest -m gpu);
#   4. gpu_bench.py again with the --compile variant (minutes of compiling; baselines rerun beside it).
# Results go to $OUT (or ./gpu-results): versions.txt, gpu-bench-eager.json/.log, gpu-tests.log,
# gpu-bench.json/.log.
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
python3 benchmarks/gpu_bench.py --runs "${RUNS:-3}" --no-compile ${BENCH_ARGS:-} --json "$out/gpu-bench-eager.json" \
  2>&1 | tee "$out/gpu-bench-eager.log"
eager=${PIPESTATUS[0]}
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
bench=0
if [ "${COMPILE:-1}" = 1 ]; then
  python3 benchmarks/gpu_bench.py --runs "${RUNS:-3}" ${BENCH_ARGS:-} --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "eager benchmark exit $eager, gpu tests exit $tests, compile benchmark exit $bench"
exit $(( eager || tests || bench ))
