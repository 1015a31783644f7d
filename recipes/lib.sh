# Shared by the recipes (sourced): resumable training runs under $WORK/runs/<name>/.
latest_run() { ls -d "$WORK/runs/$1"/*/ 2>/dev/null | sort | tail -n 1 || true; }

train() {  # name, then rdm train options; resumes the latest run of that name when there is one
    local name=$1; shift
    local run; run=$(latest_run "$name")
    if [ -n "$run" ] && ls "$run"training-state-*.pt >/dev/null 2>&1; then  # a run killed before its first
        # state has nothing to resume from: start a new one beside it
        "$RDM" train --outdir "$WORK/runs/$name" "$@" --resume "$run"
    else
        "$RDM" train --outdir "$WORK/runs/$name" "$@"
    fi
}

act() {  # activations of images $1 -> $2, unless already there
    [ -f "$2" ] || "$RDM" evaluate activations --data "$1" --dest "$2" --batch 64
}
