#!/usr/bin/env bash
# The guidance tables of examples/shapes/README.md and the top-level README, in one command:
#   examples/shapes/guidance_table.sh [MODEL] [OUT] [extra sdcli generate options...]
# Two prompt sets, each x 10 seeds x guidance 1, 2, 4, 7.5, 12 at 25 steps, then the evaluator's table per set,
# one row per guidance scale:
#   full     examples/shapes/prompts.txt          20 full captions (1000 images), written to OUT/full
#   partial  examples/shapes/prompts-partial.txt  55 prompts as people type them (2750 images), to OUT/partial
# SETS="full" (or "partial") runs one. MODEL defaults to the bundled model. About 6 min on 2 CPU cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${1:-$(python -c 'import sdcli.defaults as d; print(d.BUNDLED_MODEL)')}"
out="${2:-build/shapes/eval}"
shift $(( $# < 2 ? $# : 2 ))
for set in ${SETS:-full partial}; do
    case "$set" in
        full) prompts="$here/prompts.txt" ;;
        partial) prompts="$here/prompts-partial.txt" ;;
        *) echo "error: unknown prompt set '$set' in SETS (full, partial)" >&2; exit 2 ;;
    esac
    sdcli generate --prompt-file "$prompts" -m "$model" --seed 1,2,3,4,5,6,7,8,9,10 \
        --guidance 1,2,4,7.5,12 --steps 25 --batch-size 20 --out "$out/$set" --overwrite -q "$@" > /dev/null
    echo "$set prompts ($(basename "$prompts")):"
    python "$here/evaluate.py" "$out/$set"
done
