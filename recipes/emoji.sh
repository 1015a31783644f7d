#!/usr/bin/env bash
# The bundled tiny relay models, from scratch: data, both stages, evaluation.
#
#   bash recipes/emoji.sh [STEP ...]      steps: data stage1 stage2 export evaluate (default: all, in order)
#
# Data: the npm package emoji-datasource-google@16.0.0 (Google Noto emoji images, Apache-2.0;
# the package's own code is MIT), 3,786 emoji as 64x64 RGBA PNGs, composited on white.
# Stage 1: EDM at 16x16 on the box-downsampled images. Stage 2: blur diffusion at 64x64, relay factor 4.
# Every step resumes: re-running the script continues an interrupted training run from its latest state.
# Environment: WORK (default work-data/emoji), THREADS (torch threads per training process).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-work-data/emoji}
RDM=${RDM:-.venv/bin/rdm}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$WORK"
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(data stage1 stage2 export evaluate)

latest_run() { ls -d "$WORK/runs/$1"/*/ 2>/dev/null | sort | tail -n 1 || true; }

train() {  # name, then rdm train options; resumes the latest run of that name when there is one
    local name=$1; shift
    local run; run=$(latest_run "$name")
    if [ -n "$run" ]; then
        "$RDM" train --outdir "$WORK/runs/$name" "$@" --resume "$run"
    else
        "$RDM" train --outdir "$WORK/runs/$name" "$@"
    fi
}

for step in "${steps[@]}"; do
case $step in
data)
    if [ ! -d "$WORK/npm/node_modules/emoji-datasource-google/img/google/64" ]; then
        npm install --prefix "$WORK/npm" --no-save --no-audit --no-fund emoji-datasource-google@16.0.0
    fi
    "$RDM" dataset --source "$WORK/npm/node_modules/emoji-datasource-google/img/google/64" \
        --dest "$WORK/emoji-{res}.zip" --resolution 64x64 --resolution 16x16 --filter box \
        --background white --overwrite
    ;;
stage1)
    train stage1 --data "$WORK/emoji-16x16.zip" --arch adm --precond edm \
        --cbase 64 --cres 1,2,2 --num-blocks 2 --attn 8 --dropout 0.1 \
        --batch 64 --lr 2e-4 --lr-rampup 0.01 --ema 0.05 --duration 0.6 \
        --tick 5 --snap 4 --dump 2 --seed 1 --device cpu --workers 0
    ;;
stage2)
    train stage2 --data "$WORK/emoji-64x64.zip" --arch adm --precond blur \
        --up-scale 4 --block-scale 0.15 --prob-length 0.93 --blur-sigma-max 3.0 \
        --cbase 32 --cres 1,2,2,4 --num-blocks 1 --attn 8 --dropout 0.1 \
        --batch 32 --lr 2e-4 --lr-rampup 0.01 --ema 0.05 --duration 0.2 \
        --tick 2 --snap 5 --dump 2 --seed 2 --device cpu --workers 0
    ;;
export)
    echo "export: see docs (bundled weights are written by python -m relay_diffusion.bundled)"
    ;;
evaluate)
    echo "evaluate: not yet"
    ;;
*) echo "unknown step: $step (steps: data stage1 stage2 export evaluate)" >&2; exit 2 ;;
esac
done
