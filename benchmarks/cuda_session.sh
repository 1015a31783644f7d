#!/usr/bin/env bash
# Every CUDA check of the project in one run that fits a short GPU lease (about 8 minutes on one H100/H200),
# from the repository root, with the machine's own python3 that holds a CUDA torch (the package is used from
# src/, nothing is installed; it needs torch, numpy, scipy, pillow, click, tqdm, safetensors and pytest):
#
#     bash benchmarks/cuda_session.sh [OUTDIR]        # OUTDIR defaults to $OUT, else benchmarks/cuda-out
#
# 1. the GPU and torch it found (env.txt);
# 2. the CUDA-only tests (tests/test_cuda.py and the reduced-precision network tests): one network call per
#    sampler step, batch dependence of images, the CLI's speed options, training steps in fp32/bf16/fp16
#    (tests.txt, 150 s at most);
# 3. benchmarks/bench_cuda.py at batch 64 within a budget of BENCH_BUDGET seconds (default 330): the
#    configurations in order (previous defaults, fp32, bf16, bf16 + compile, ...) until the budget is spent,
#    the table rewritten after each (cuda.md, cuda.jsonl, bench.log).
# Exit status: that of the tests, else that of the benchmark.
set -u
OUTDIR=${1:-${OUT:-benchmarks/cuda-out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS

{ nvidia-smi -L 2>&1; "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"; } | tee "$OUTDIR/env.txt"

timeout 150 "$PY" -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py \
    "tests/test_networks.py::test_reduced_precision_on_cuda" 2>&1 | tee "$OUTDIR/tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "tests: exit $tests_rc after $((SECONDS - start)) s" | tee -a "$OUTDIR/tests.txt"

timeout $(( ${BENCH_BUDGET:-330} + 60 )) "$PY" benchmarks/bench_cuda.py --device cuda --batch 64 --repeats 3 \
    --budget "${BENCH_BUDGET:-330}" --out "$OUTDIR/cuda.md" 2>&1 | tee "$OUTDIR/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: exit $bench_rc after $((SECONDS - start)) s in all" | tee -a "$OUTDIR/bench.log"
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$bench_rc"
