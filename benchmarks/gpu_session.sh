#!/usr/bin/env bash
# One lent-GPU session (the `device` tool): install, CUDA tests, CUDA benchmarks; logs and JSON in $OUT.
#
#   bash benchmarks/gpu_session.sh tests ops     # first call
#   bash benchmarks/gpu_session.sh model         # second call, on the still-warm machine
#   bash benchmarks/gpu_session.sh graphs        # inference under CUDA-graph replay (extra columns)
#   bash benchmarks/gpu_session.sh tune          # grouped-adapter forward: configs and cuBLAS pieces
#   bash benchmarks/gpu_session.sh profile       # profiler tables of the cases that miss their targets
#   bash benchmarks/gpu_session.sh model-eager   # the model suite without any torch.compile (faster)
#   bash benchmarks/gpu_session.sh compiled      # only the torch.compile cases that matter for the targets
#   bash benchmarks/gpu_session.sh kernels       # the interpreter parity tests, against the compiled kernels
#   bash benchmarks/gpu_session.sh compiled-train  # single-dataset training step with "fast+compiled" (train --compile)
#
# Durations on an H200 (2026-11-30): start ~1.5 min; tests ~4 min with autotuning (which dominated; 170 s
# was too short), so the tests stage now runs each kernel's first config only (MOSAIC_FAST_AUTOTUNE=0;
# the benchmark stages still tune, i.e. compile and run every config); ops 290 s with torch.compile; model 175 s. A session's device time is 15 min in all, so
# plan two calls: `tests model` (TESTS_S=260 BENCH_S=200), then at once on the warm machine `ops` or
# `graphs tune`.
#
# Each stage has its own time limit, and the benchmark rewrites its JSON after every case, so a stage cut
# short still returns what it measured. medmnist (not in the GPU image) travels as a wheel in .whl/
# (ignored by git), fetched here once with:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl medmnist==3.0.2
# and sent along with the device tool's carry=[".whl"].
set -u
stages="tests kernels tune graphs profile compiled compiled-train model-eager ops model"
for stage in "$@"; do  # before the install: a misspelt stage would otherwise be skipped in silence
  case " $stages " in *" $stage "*) ;; *) echo "gpu_session.sh: unknown stage '$stage' (stages: $stages)"; exit 2 ;; esac
done
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_session.sh STAGE [STAGE ...] (stages: $stages)"; exit 2; }
OUT=${OUT:-/tmp/mosaic_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
tag=$(date -u +%Y-%m-%d)_h200
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# (the install log stays out of $OUT: only 8 files come back)
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >/tmp/install.log 2>&1 \
  || { echo "pip install -e . failed"; tail -20 /tmp/install.log; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -m mosaic_fast.cli info 2>&1 | tail -12
for stage in "$@"; do
  case $stage in
    tests) MOSAIC_FAST_AUTOTUNE=0 timeout "${TESTS_S:-200}" python3 -m pytest -m cuda -q -rfEs -p no:cacheprovider --durations=8 tests \
             2>&1 | tee "$OUT/pytest_cuda.log" | tail -40 ;;
    kernels) MOSAIC_FAST_AUTOTUNE=0 timeout "${TESTS_S:-200}" python3 -m pytest -m "kernels and not cuda" -q -rfEs \
             -p no:cacheprovider --durations=8 tests 2>&1 | tee "$OUT/pytest_kernels.log" | tail -40 ;;
    tune) timeout "${BENCH_S:-300}" python3 benchmarks/tune_grouped_adapter.py --json "$OUT/${tag}_tune.json" \
             2>&1 | tee "$OUT/tune.log" | tail -45 ;;
    graphs) timeout "${BENCH_S:-300}" python3 benchmarks/run.py all --device cuda --graphs --no-compile --targets \
             --filter moe_skip --filter infer --filter train_step --filter dynamer \
             --json "$OUT/${tag}_graphs.json" --markdown "$OUT/${tag}_graphs.md" 2>"$OUT/bench_graphs.err" \
             | tee "$OUT/bench_graphs.log" | tail -45 ;;
    profile) timeout "${BENCH_S:-300}" python3 benchmarks/profile_cases.py --device cuda \
             --filter moe_skip_rho1 --filter moe_skip_rho0.1 --filter mosaic_train_step_single \
             --filter mosaic_infer_single --filter dynamer_block_rho1 --out "$OUT/${tag}_profile.txt" \
             2>&1 | tail -30 ;;
    compiled) timeout "${BENCH_S:-300}" python3 benchmarks/run.py model --device cuda --targets \
             --filter mosaic_infer_single --filter dynamer_block_rho1 --filter dynamer_block_rho0.5 \
             --json "$OUT/${tag}_compiled.json" 2>"$OUT/bench_compiled.err" | tail -20 ;;
    compiled-train) timeout "${BENCH_S:-300}" python3 benchmarks/run.py model --device cuda --targets \
             --filter mosaic_train_step_single --json "$OUT/${tag}_compiled_train.json" \
             2>"$OUT/bench_compiled_train.err" | tail -20 ;;
    model-eager) timeout "${BENCH_S:-300}" python3 benchmarks/run.py model --device cuda --no-compile --targets \
             --json "$OUT/${tag}_model.json" --markdown "$OUT/${tag}_model.md" 2>"$OUT/bench_model.err" \
             | tee "$OUT/bench_model.log" | tail -45 ;;
    ops|model) timeout "${BENCH_S:-300}" python3 benchmarks/run.py "$stage" --device cuda --targets \
             --json "$OUT/${tag}_$stage.json" --markdown "$OUT/${tag}_$stage.md" 2>"$OUT/bench_$stage.err" \
             | tee "$OUT/bench_$stage.log" | tail -45 ;;
  esac
done
