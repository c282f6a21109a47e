#!/usr/bin/env bash
# Rebuild sdcli's bundled model from nothing, as it was built (examples/shapes/README.md has what each step printed):
#   examples/shapes/recipe.sh [OUT]          # OUT defaults to build/shapes; about 40 min on 2 CPU cores
# The sizes can be shrunk for a quick end-to-end check (the test suite does this):
#   N=80 VAE_STEPS=2 UNET_STEPS=2 TABLE=0 examples/shapes/recipe.sh /tmp/shapes   (N > 64: 64 are held out)
# The result is OUT/model, a diffusers pipeline folder; step 7 of the README copies it into sdcli/models/shapes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-build/shapes}"
N="${N:-10000}"                  # dataset images
NOISE="${NOISE:-0.1}"            # chance that each of colour, shape, size, position is named wrong in a caption
VAE_STEPS="${VAE_STEPS:-1000}"   # steps of the autoencoder's first and third runs (the second runs 80 % of it)
UNET_STEPS="${UNET_STEPS:-5000}" # UNet optimiser steps at batch 64
THREADS="${THREADS:-2}"
TABLE="${TABLE:-1}"              # 1: finish with the guidance table
mkdir -p "$out"

# 1. Dataset: PNGs + metadata.jsonl (the imagefolder layout sdcli finetune reads).
python "$here/dataset.py" --out "$out/data" --n "$N" --seed 0 --caption-noise "$NOISE" > /dev/null
# 2. Tokenizer: each caption word one token.
python "$here/tokenizer.py" --data "$out/data" --out "$out/tokenizer" > /dev/null
# 3. Autoencoder in three runs: colour first, then edges, then the same at half the learning rate.
python "$here/train_vae.py" --data "$out/data" --out "$out/vae1" --steps "$VAE_STEPS" --colour-weight 10 \
    --threads "$THREADS" > /dev/null
python "$here/train_vae.py" --data "$out/data" --out "$out/vae2" --init "$out/vae1" --steps $(( VAE_STEPS * 4 / 5 )) \
    --colour-weight 10 --edge-weight 10 --seed 1 --threads "$THREADS" > /dev/null
python "$here/train_vae.py" --data "$out/data" --out "$out/vae" --init "$out/vae2" --steps "$VAE_STEPS" \
    --colour-weight 10 --edge-weight 10 --seed 2 --lr 5e-4 --threads "$THREADS" > /dev/null
# 4. The pipeline: trained autoencoder and tokenizer, random UNet and text encoder.
python "$here/build_pipeline.py" --vae "$out/vae" --tokenizer "$out/tokenizer" --out "$out/init" > /dev/null
# 5. The UNet, with sdcli's own finetune; the random text encoder stays frozen.
OMP_NUM_THREADS="$THREADS" sdcli finetune --full -m "$out/init" --data "$out/data" --out "$out/model" \
    --batch-size 64 --learning-rate 1e-3 --lr-scheduler cosine --lr-warmup-steps 50 --max-steps "$UNET_STEPS" \
    --no-flip --checkpoint-every 1000 --keep-checkpoints 1 --overwrite > /dev/null
# 6. What guidance does to it.
if [ "$TABLE" = 1 ]; then
    OMP_NUM_THREADS="$THREADS" "$here/guidance_table.sh" "$out/model" "$out/eval"
fi
echo "$out/model"
