#!/usr/bin/env bash
# Every CUDA check of the project in one run that fits a short GPU lease, from the repository root, with the
# machine's own python3 that holds a CUDA torch (the package is used from src/, nothing is installed; it needs
# torch, numpy, scipy, pillow, click, tqdm, safetensors and pytest):
#
#     bash benchmarks/cuda_session.sh [OUTDIR]        # OUTDIR defaults to $OUT, else benchmarks/cuda-out
#
# 0. refuses a machine where torch sees no CUDA device (exit 3): nothing below would measure anything;
# 1. the GPU and torch it found (env.txt);
# 2. the CUDA-only tests (tests/test_cuda.py and the reduced-precision network tests): one network call per
#    sampler step, batch dependence of images, the CLI's speed options, training steps in fp32/bf16/fp16,
#    attention on the fused SDPA kernels (tests.txt, TESTS_TIMEOUT seconds at most, default 150). A skipped
#    test counts as a failure here: on this machine every one of them must run;
# 3. benchmarks/bench_adm256.py: the reference's ImageNet-256 stage-2 network (550 M parameters) in bf16 at
#    batch 8, 16, 32 per GPU, the earlier attention layout against the current one, and compiled if the budget
#    allows (adm256.md, ADM_BUDGET seconds, default 200; 0 skips it; ADM_BATCHES and ADM_EXTRA, e.g.
#    "--layout-batch 0 --compile-batch 0", narrow it);
# 4. benchmarks/bench_cuda.py at batch 64 within BENCH_BUDGET seconds (default 330; 0 skips it): the bundled
#    stages' configurations in order (previous defaults, fp32, bf16, bf16 + compile, ...), the table rewritten
#    after each (cuda.md, cuda.jsonl, bench.log).
# Exit status: 3 without CUDA, else that of the tests, else the first failing benchmark's.
set -u
OUTDIR=${1:-${OUT:-benchmarks/cuda-out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS

{ nvidia-smi -L 2>&1; "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"; } | tee "$OUTDIR/env.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA device on this machine; the CUDA checks need one" | tee -a "$OUTDIR/env.txt" >&2
    exit 3
fi

timeout "${TESTS_TIMEOUT:-150}" "$PY" -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py \
    "tests/test_networks.py::test_reduced_precision_on_cuda" 2>&1 | tee "$OUTDIR/tests.txt"
tests_rc=${PIPESTATUS[0]}
if [ "$tests_rc" -eq 0 ] && grep -Eq '^SKIPPED|[0-9]+ skipped' "$OUTDIR/tests.txt"; then
    echo "tests: a CUDA test was skipped on a CUDA machine; counted as a failure" | tee -a "$OUTDIR/tests.txt"
    tests_rc=1
fi
echo "tests: exit $tests_rc after $((SECONDS - start)) s" | tee -a "$OUTDIR/tests.txt"

adm_rc=0
if [ "${ADM_BUDGET:-200}" -gt 0 ]; then
    timeout $(( ${ADM_BUDGET:-200} + 90 )) "$PY" benchmarks/bench_adm256.py --device cuda --precision bf16 \
        --batches "${ADM_BATCHES:-8,16,32}" --budget "${ADM_BUDGET:-200}" ${ADM_EXTRA:-} --out "$OUTDIR/adm256.md" 2>&1 \
        | tee "$OUTDIR/adm256.log"
    adm_rc=${PIPESTATUS[0]}
    echo "adm256: exit $adm_rc after $((SECONDS - start)) s in all" | tee -a "$OUTDIR/adm256.log"
fi

bench_rc=0
if [ "${BENCH_BUDGET:-330}" -gt 0 ]; then
    timeout $(( ${BENCH_BUDGET:-330} + 60 )) "$PY" benchmarks/bench_cuda.py --device cuda --batch 64 --repeats 3 \
        --budget "${BENCH_BUDGET:-330}" ${BENCH_EXTRA:-} --out "$OUTDIR/cuda.md" 2>&1 | tee "$OUTDIR/bench.log"
    bench_rc=${PIPESTATUS[0]}
    echo "benchmark: exit $bench_rc after $((SECONDS - start)) s in all" | tee -a "$OUTDIR/bench.log"
fi
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
[ "$adm_rc" -ne 0 ] && exit "$adm_rc"
exit "$bench_rc"
