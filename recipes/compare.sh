#!/usr/bin/env bash
# What relaying buys: the relay pair against a single-stage 64x64 model and a cascaded super-resolution stage,
# at equal training compute, on emoji held out from training (docs/compare/README.md has the results).
#
#   bash recipes/compare.sh [STEP ...]   steps: data relay1 relay2 single sr noblock evaluate report
#                                        (default: all, in order)
#
# Arms (every run on the same training split, one CPU thread each):
#   relay    stage 1 (EDM 16x16) + relay stage 2 (blur diffusion 64x64)  = the budget
#   single   EDM at 64x64 with the relay stage 2's network, trained for the whole budget
#   sr       cascaded super-resolution stage (the same network, + the conditioning channels), the relay
#            stage 2's budget, noise-conditioning augmentation up to 0.5; after the same stage 1
#   noblock  the relay stage 2 without block noise (--block-scale 0), same budget
# SIZE picks the networks and durations (kimg); measured on one thread of the 2-core CPU:
#   session  (default) stage 1 ADM cbase 32 (10 s/kimg at batch 64) for 150 kimg, the 64x64 stages ADM
#            cbase 16 (43 s/kimg at batch 32) for 35 kimg, single 70 kimg: about 9,000 CPU-s of training
#            and 6,600 of evaluation, which fits one 3-hour session on 2 cores
#   bundled  the bundled models' options: stage 1 ADM cbase 64 (30 s/kimg) for 200 kimg, the 64x64 stages
#            ADM cbase 32 (129 s/kimg) for 64 kimg, single 112 kimg: about 45,000 CPU-s of training
# Every training step resumes: re-running the script continues interrupted runs from their latest state.
# The steps relay1 relay2 single sr noblock are independent (run them side by side, one core each).
# Environment: SIZE (session or bundled, above), WORK (default work-data/compare/$SIZE), EMOJI (the emoji
# recipe's folder, default work-data/emoji), THREADS (torch threads per process, default 1), JOBS (how many
# of the evaluate step's sampling and activation commands run at once, default 1; JOBS=2 on 2 cores), N
# (samples per arm, default 2000).
set -euo pipefail
cd "$(dirname "$0")/.."
# NET16: stage 1's network; NET64: the relay stage 2's network, shared by the 64x64 arms; K1, K2, KS: the
# durations (Mimg) of stage 1, of each 64x64 stage, of the single stage (K1 + K2 converted at the 64x64 rate).
SIZE=${SIZE:-session}
case $SIZE in
session) NET16=(--cbase 32 --cres 1,2,2 --num-blocks 2); NET64=(--cbase 16 --cres 1,2,2,4 --num-blocks 1)
         K1=0.15; K2=0.035; KS=0.07 ;;
bundled) NET16=(--cbase 64 --cres 1,2,2 --num-blocks 2); NET64=(--cbase 32 --cres 1,2,2,4 --num-blocks 1)
         K1=0.2; K2=0.064; KS=0.112 ;;
*) echo "unknown SIZE: $SIZE (session or bundled)" >&2; exit 2 ;;
esac
NET16=(--arch adm "${NET16[@]}" --attn 8 --dropout 0.1)
NET64=(--arch adm "${NET64[@]}" --attn 8 --dropout 0.1)
WORK=${WORK:-work-data/compare/$SIZE}  # one folder per SIZE: runs of two sizes never mix
EMOJI=${EMOJI:-work-data/emoji}
RDM=${RDM:-.venv/bin/rdm}
PY=${PY:-.venv/bin/python}
N=${N:-2000}
JOBS=${JOBS:-1}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "JOBS must be a positive whole number, got: $JOBS" >&2; exit 2; }
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$WORK"
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(data relay1 relay2 single sr noblock evaluate report)

source recipes/lib.sh
latest_snapshot() { ls "$(latest_run "$1")"network-snapshot-*.safetensors | sort | tail -n 1; }

COMMON=(--lr 2e-4 --lr-rampup 0.01 --ema 0.05 --device cpu --workers 0)

calc() {  # FID, KID (subsets of 500: the held-out set has 820 images) and precision/recall of activations $1
          # against $2 -> JSON $3, unless already there
    [ -f "$3" ] || "$RDM" evaluate calc -m fid -m kid -m pr --kid-subset-size 500 --activations_sample "$1" \
        --activations_ref "$2" --json "$3"
}

relay_stage() {  # name, block scale: the bundled relay stage 2's options on the training split
    train "$1" --data "$WORK/train-64x64.zip" --precond blur "${NET64[@]}" \
        --up-scale 4 --block-scale "$2" --prob-length 0.93 --blur-sigma-max 3.0 \
        --batch 32 --duration "$K2" --tick 2 --snap 5 --dump 2 --seed 2 "${COMMON[@]}"
}

gen() {  # outdir, then rdm generate options (resumes: existing images are kept)
    local out=$1; shift
    "$RDM" generate --outdir "$out" --batch 64 "$@"
}

# The evaluate step's commands are independent: at most $JOBS at a time. A failed one stops the recipe once
# the others that are running have finished (each resumes where it stopped when the step is run again).
join() { local pid rc=0; for pid in $(jobs -p); do wait "$pid" || rc=$?; done; return $rc; }
spawn() {
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || { join || true; return 1; }; done
    "$@" &
}

for step in "${steps[@]}"; do
case $step in
data)
    src="$EMOJI/npm/node_modules/emoji-datasource-google/img/google/64"
    [ -d "$src" ] || bash recipes/emoji.sh data
    if [ ! -d "$WORK/src/train" ]; then
        "$PY" recipes/holdout.py "$src" "$WORK/src/train.tmp" "$WORK/src/heldout.tmp"
        mv "$WORK/src/heldout.tmp" "$WORK/src/heldout" && mv "$WORK/src/train.tmp" "$WORK/src/train"
    fi
    for part in train heldout; do
        "$RDM" dataset --source "$WORK/src/$part" --dest "$WORK/$part-{res}.zip" --resolution 64x64 \
            --resolution 16x16 --filter box --background white --overwrite
    done
    ;;
relay1)
    train relay1 --data "$WORK/train-16x16.zip" --precond edm "${NET16[@]}" \
        --batch 64 --duration "$K1" --tick 5 --snap 4 --dump 2 --seed 1 "${COMMON[@]}"
    ;;
relay2) relay_stage relay2 0.15 ;;
single)
    train single --data "$WORK/train-64x64.zip" --precond edm "${NET64[@]}" \
        --batch 32 --duration "$KS" --tick 2 --snap 8 --dump 2 --seed 2 "${COMMON[@]}"
    ;;
sr)
    train sr --data "$WORK/train-64x64.zip" --precond sr "${NET64[@]}" --up-scale 4 --noise-aug 0.5 \
        --batch 32 --duration "$K2" --tick 2 --snap 5 --dump 2 --seed 2 "${COMMON[@]}"
    ;;
noblock) relay_stage noblock 0 ;;
evaluate)
    # Samples: seeds 0..N-1 for every arm (FID's sampling error: from disjoint halves and a bootstrap, in the
    # report),
    # the same number of network evaluations per image: relay and cascade 35 + 13 = 48 (stage 1: the default
    # 18 Heun steps at 16x16; relay stage: the default grid, 13 NFE after truncation; SR: 7 Heun steps), the
    # single stage 24 Heun steps = 47 at 64x64. And each 64x64 stage fed the real 16x16 images of the
    # held-out emoji (super-resolution of emoji no model saw).
    E="$WORK/eval"; mkdir -p "$E"
    s1=$(latest_snapshot relay1)
    last=$((N - 1))
    # the held-out emoji's real 16x16 images as stage inputs (seed i = the i-th held-out image)
    [ -d "$E/heldout16" ] || "$PY" recipes/compare_report.py inputs "$WORK/heldout-16x16.zip" "$E/heldout16"
    H=$(($(ls "$E/heldout16" | wc -l) - 1))
    spawn gen "$E/relay" --seeds "0-$last" --network_first "$s1" --network_second "$(latest_snapshot relay2)"
    spawn gen "$E/single" --seeds "0-$last" --sampler_stages first --network_first "$(latest_snapshot single)" \
        --num_steps_first 24
    spawn gen "$E/sr" --seeds "0-$last" --network_first "$s1" --network_second "$(latest_snapshot sr)"
    spawn gen "$E/noblock" --seeds "0-$last" --network_first "$s1" --network_second "$(latest_snapshot noblock)"
    spawn gen "$E/stage1" --seeds "0-$last" --sampler_stages first --network_first "$s1"
    for arm in relay2 sr noblock; do
        spawn gen "$E/sr-heldout-$arm" --seeds "0-$H" --sampler_stages second --indir "$E/heldout16" \
            --network_second "$(latest_snapshot $arm)"
    done
    join
    sets=(relay single sr noblock stage1 sr-heldout-relay2 sr-heldout-sr sr-heldout-noblock)
    for ref in train heldout; do spawn act "$WORK/$ref-64x64.zip" "$E/act-$ref.npz"; done
    for set in "${sets[@]}"; do spawn act "$E/$set" "$E/act-$set.npz"; done
    spawn act "$WORK/heldout-16x16.zip" "$E/act-heldout16.npz"   # the real 16x16 images themselves, for scale
    join
    for set in "${sets[@]}"; do
        for ref in train heldout; do
            calc "$E/act-$set.npz" "$E/act-$ref.npz" "$E/fid-$set-vs-$ref.json"
        done
    done
    calc "$E/act-heldout16.npz" "$E/act-heldout.npz" "$E/fid-heldout16-vs-heldout.json"
    ;;
report)
    # docs/compare/: results.json, README table, side-by-side grids, training budgets from the runs' stats
    "$PY" recipes/compare_report.py report --work "$WORK" --out docs/compare
    ;;
*) echo "unknown step: $step (steps: data relay1 relay2 single sr noblock evaluate report)" >&2; exit 2 ;;
esac
done
