#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the device machine (which reaches no package index and has torch,
# transformers, peft, accelerate, safetensors, typer and rich already), for its Python 3.12, into .whl/ (ignored
# by git; the device tool's `carry`). bitsandbytes ships a library per CUDA version (43 MB); only CUDA 13's are
# kept, so everything fits in the 64 MiB a call carries beside the repository (about 18 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl diffusers==0.42.1 importlib_metadata torchao==0.18.0 bitsandbytes gguf fastapi starlette uvicorn \
  python-multipart pydantic pydantic-core annotated-types typing-inspection
python3 - <<'PY'
import glob, re, zipfile, os
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    keep = lambda n: not re.search(r"libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)", n)
    slim = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not keep(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith("/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if l.strip() and keep(l.decode()))
            dst.writestr(item, data)
    os.replace(slim, path)
PY
du -ch .whl/*.whl | tail -1
