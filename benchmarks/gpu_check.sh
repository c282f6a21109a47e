#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA torch but without network access. Each stage runs
# under its own time limit and writes to $OUT (or ./gpu-results) as it goes, so a stage that fails or
# runs long still leaves the others' figures:
#   1. install diffusers from wheels carried in .whl/ (if any), without touching torch;
#   2. benchmarks/gpu_bench.py at full size (SD 1.5's architecture, 512 px, 25 steps): plain diffusers and
#      sdcli's defaults at batch 1 and 4 (with --bisect, the default BENCH_ARGS: four more eager variants,
#      plain diffusers twice among them), peak memory with and without --cpu-offload, then sdcli --compile in
#      each mode of COMPILE_MODES (compiling timed apart) -> gpu-bench.json/.log;
#   3. the CUDA tests (python -m pytest -m gpu; TESTS="-k compile" picks some) -> gpu-tests.log;
#   4. benchmarks/finetune_bench.py on the same pipeline: LoRA at 512 px, batch 4, fp16, sdcli against the loop
#      of diffusers' train_text_to_image_lora.py -> finetune-bench.json/.log;
#   5. benchmarks/unet_roofline.py: the UNet alone, eager and compiled, against the card's own matmul rate, with
#      the profiler's kernel time (a cross-check of stage 2's TFLOP/s) -> roofline.json/.log.
#   6. benchmarks/flux_gpu_bench.py (the GPU issue's items 2, 3, 5): a FLUX.1-size transformer with random weights
#      at 1024 px, 28 steps: bf16, --storage-dtype float8, torchao fp8, bitsandbytes nf4 and a GGUF Q8_0 file,
#      with and without --offload model, sdcli against plain diffusers; the step caches; QLoRA (nf4) against bf16
#      LoRA -> flux-bench.json/.log (FLUX_ARGS picks, e.g. "--stages modes --modes bf16,nf4 --offloads none");
#   7. benchmarks/serve_bench.py on bench's saved SD 1.5 model on the GPU, 4 clients -> serve-bench.json/.log.
# STAGES picks and orders them (default: bench,tests,finetune, about 10 min with start-up; roofline on request);
# finetune and serve need bench's saved model. The FLUX stage needs diffusers, torchao, bitsandbytes and gguf,
# serve fastapi/uvicorn: benchmarks/gpu_wheels.sh fetches them (slimmed to fit the 64 MiB a call carries). MODES defaults to reduce-overhead alone (each batch size compiles anew,
# about a minute each; default mode was measured at batch 1 on 2026-11-26). The eager comparison that settled
# channels-last (2026-11-27): BATCH=4,1 RUNS=12 STAGES=bench BENCH_ARGS="--bisect --no-compile" (4 min).
# versions.txt holds the card, torch and diffusers. The device tool's command: `bash benchmarks/gpu_check.sh`
# with `.whl` carried.
#
# Preparing the wheels, on a machine with PyPI (see the device tool's README for the platform flags):
#   bash benchmarks/gpu_wheels.sh
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
python3 -c "import torch, diffusers, transformers, peft, accelerate as a; print(torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', a.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee "$out/versions.txt" || exit 1
date -u +%FT%TZ >> "$out/versions.txt"
model=/tmp/sd15-random
status=0
for stage in $(echo "${STAGES:-bench,tests,finetune}" | tr , ' '); do
  case $stage in
    bench)
      timeout "${BENCH_LIMIT:-330}" python3 benchmarks/gpu_bench.py --runs "${RUNS:-3}" --batch "${BATCH:-1,4}" \
        --compile-modes "${MODES:-reduce-overhead}" --lora-steps 0 --save-model "$model" ${BENCH_ARGS:---bisect} \
        --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log" ;;
    tests)
      timeout "${TESTS_LIMIT:-200}" python3 -m pytest -m gpu -q -rs --durations=30 -p no:cacheprovider ${TESTS:-} tests \
        2>&1 | tee "$out/gpu-tests.log" ;;
    finetune)
      timeout "${FINETUNE_LIMIT:-150}" python3 benchmarks/finetune_bench.py --model "$model/sd15" --resolution 512 \
        --batch-size 4 --steps "${FINETUNE_STEPS:-30}" --runs "${FINETUNE_RUNS:-1}" --json "$out/finetune-bench.json" \
        2>&1 | tee "$out/finetune-bench.log" ;;
    roofline)
      timeout "${ROOFLINE_LIMIT:-150}" python3 benchmarks/unet_roofline.py --batch "${ROOFLINE_BATCH:-4}" \
        --mode "${ROOFLINE_MODE:-reduce-overhead}" --json "$out/roofline.json" 2>&1 | tee "$out/roofline.log" ;;
    flux)
      timeout "${FLUX_LIMIT:-420}" python3 benchmarks/flux_gpu_bench.py ${FLUX_ARGS:-} --json "$out/flux-bench.json" \
        2>&1 | tee "$out/flux-bench.log" ;;
    serve)
      timeout "${SERVE_LIMIT:-120}" python3 benchmarks/serve_bench.py --model "$model/sd15" --device cuda --clients 4 \
        --each 3 --json "$out/serve-bench.json" 2>&1 | tee "$out/serve-bench.log" ;;
    *) echo "unknown stage $stage (bench, tests, finetune, roofline, flux, serve)" >&2; exit 2 ;;
  esac
  code=${PIPESTATUS[0]}
  echo "stage $stage exit $code"
  [ "$code" = 0 ] || status=1
done
exit $status
