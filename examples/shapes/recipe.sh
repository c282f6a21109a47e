#!/usr/bin/env bash
# Rebuild sdcli's bundled model from nothing, as it was built (examples/shapes/README.md has what each step printed):
#   examples/shapes/recipe.sh [OUT]          # OUT defaults to build/shapes; 75 min on 2 CPU cores, 87 with the tables
# The defaults are what built the shipped weights (partial captions, four autoencoder runs, the last at edge weight 30,
# 6000 UNet steps with --debiased-loss and a floor under its SNR). The models shipped before it were, in about 64 min
# (partial captions, --debiased-loss without a floor) and 40 min (full captions only, plain MSE):
#   LAST_EDGE=10 UNET_ARGS=--debiased-loss examples/shapes/recipe.sh
#   PARTIAL=0 HELD_OUT=64 VAE_RUNS=3 UNET_STEPS=5000 UNET_ARGS= examples/shapes/recipe.sh
# The runs of examples/shapes/README.md between them (not shipped): UNET_ARGS=--debiased-loss alone, the
# sharper-autoencoder model (65.5 min); that with PARTIAL=0.2, the fewer-partial-captions one (65-70 min); PARTIAL=0.2
# with today's defaults, the first floor run (73 min). The partial-caption attempts were LAST_EDGE=10 with
# NOISY=...,background and UNET_ARGS= (the first; the second also with TOKEN_STD=0.6), each in about 68.5 min.
# Each step's wall time goes to stderr. The sizes can be shrunk for a quick end-to-end check (the test suite does this):
#   N=80 HELD_OUT=16 VAE_STEPS=2 UNET_STEPS=2 TABLE=0 examples/shapes/recipe.sh /tmp/shapes
# The result is OUT/model, a diffusers pipeline folder; step 7 of the README copies it into sdcli/models/shapes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-build/shapes}"
N="${N:-10000}"                  # dataset images
NOISE="${NOISE:-0.1}"            # chance that each attribute of NOISY is named wrong in a caption
NOISY="${NOISY:-color,shape,size,position}"  # attributes the noise may name wrong (background too, if listed)
PARTIAL="${PARTIAL:-0.3}"        # chance that each of size, colour, position, background is left out of a caption
HELD_OUT="${HELD_OUT:-500}"      # images the autoencoder never trains on, to score its reconstructions
VAE_STEPS="${VAE_STEPS:-1000}"   # steps of each autoencoder run (the second runs 80 % of it)
VAE_RUNS="${VAE_RUNS:-4}"        # 4 adds a run at a quarter of the learning rate (sharper: shapes 94.6 -> 98.2 %, 100 % at edge 30)
LAST_EDGE="${LAST_EDGE:-30}"     # edge weight of that fourth run (30 rather than 10: small stars read right 84 -> 97 %)
UNET_STEPS="${UNET_STEPS:-6000}" # UNet optimiser steps at batch 64
TOKEN_STD="${TOKEN_STD:-}"       # text encoder word-embedding std (empty: CLIP's init, 0.02; the second attempt: 0.6)
UNET_ARGS="${UNET_ARGS---debiased-loss --debiased-snr-floor 0.0083}"  # more `sdcli finetune` options for step 5 (empty: plain MSE)
THREADS="${THREADS:-2}"
TABLE="${TABLE:-1}"              # 1: finish with the guidance tables
mkdir -p "$out"
started=$SECONDS
done_step() { local s=$(( SECONDS - started )); printf '%s done at %d:%02d\n' "$1" $(( s / 60 )) $(( s % 60 )) >&2; }
vae() { python "$here/train_vae.py" --data "$out/data" --held-out "$HELD_OUT" --colour-weight 10 --threads "$THREADS" "$@" > /dev/null; }

# 1. Dataset: PNGs + metadata.jsonl (the imagefolder layout sdcli finetune reads).
python "$here/dataset.py" --out "$out/data" --n "$N" --seed 0 --caption-noise "$NOISE" --noisy "$NOISY" \
    --partial "$PARTIAL" > /dev/null
done_step "1. dataset"
# 2. Tokenizer: each caption word one token.
python "$here/tokenizer.py" --data "$out/data" --out "$out/tokenizer" > /dev/null
done_step "2. tokenizer"
# 3. Autoencoder in three runs: colour first, then edges, then the same at half the learning rate (and with
#    VAE_RUNS=4, once more at a quarter of it).
vae --out "$out/vae1" --steps "$VAE_STEPS"
vae --out "$out/vae2" --init "$out/vae1" --steps $(( VAE_STEPS * 4 / 5 )) --edge-weight 10 --seed 1
if [ "$VAE_RUNS" = 4 ]; then
    vae --out "$out/vae3" --init "$out/vae2" --steps "$VAE_STEPS" --edge-weight 10 --seed 2 --lr 5e-4
    vae --out "$out/vae" --init "$out/vae3" --steps "$VAE_STEPS" --edge-weight "$LAST_EDGE" --seed 3 --lr 2.5e-4
else
    vae --out "$out/vae" --init "$out/vae2" --steps "$VAE_STEPS" --edge-weight 10 --seed 2 --lr 5e-4
fi
done_step "3. autoencoder"
# 4. The pipeline: trained autoencoder and tokenizer, random UNet and text encoder.
python "$here/build_pipeline.py" --vae "$out/vae" --tokenizer "$out/tokenizer" --out "$out/init" \
    ${TOKEN_STD:+--token-std "$TOKEN_STD"} > /dev/null
done_step "4. pipeline"
# 5. The UNet, with sdcli's own finetune; the random text encoder stays frozen.
OMP_NUM_THREADS="$THREADS" sdcli finetune --full -m "$out/init" --data "$out/data" --out "$out/model" \
    --batch-size 64 --learning-rate 1e-3 --lr-scheduler cosine --lr-warmup-steps 50 --max-steps "$UNET_STEPS" \
    --no-flip --checkpoint-every 1000 --keep-checkpoints 1 --overwrite $UNET_ARGS > /dev/null
done_step "5. UNet"
# 6. What guidance does to it, on full captions and on partial prompts.
if [ "$TABLE" = 1 ]; then
    OMP_NUM_THREADS="$THREADS" "$here/guidance_table.sh" "$out/model" "$out/eval" > "$out/guidance_tables.md"
    cat "$out/guidance_tables.md" >&2
    done_step "6. guidance tables"
fi
echo "$out/model"
