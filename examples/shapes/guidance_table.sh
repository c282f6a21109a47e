#!/usr/bin/env bash
# The guidance table of examples/shapes/README.md and the top-level README, in one command:
#   examples/shapes/guidance_table.sh [MODEL] [OUT] [extra sdcli generate options...]
# 20 captions (examples/shapes/prompts.txt) x 10 seeds x guidance 1, 2, 4, 7.5, 12 at 25 steps = 1000 images,
# then the evaluator's table, one row per guidance scale. MODEL defaults to the bundled model.
# Takes about 2 min on 2 CPU cores (1:43 for the shipped model).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${1:-$(python -c 'import sdcli.defaults as d; print(d.BUNDLED_MODEL)')}"
out="${2:-build/shapes/eval}"
shift $(( $# < 2 ? $# : 2 ))
sdcli generate --prompt-file "$here/prompts.txt" -m "$model" --seed 1,2,3,4,5,6,7,8,9,10 \
    --guidance 1,2,4,7.5,12 --steps 25 --batch-size 20 --out "$out" --overwrite -q "$@" > /dev/null
python "$here/evaluate.py" "$out"
