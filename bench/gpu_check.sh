#!/usr/bin/env bash
# The GPU check, as one prepared command for a session that has a GPU (an H100 or H200 of the device tool), most
# valuable first, since a lease may end before the last stage:
#   1. a short teacher-training smoke on the GPU (configs/tiny.py, --mode=train_teacher),
#   2. bench at the CIFAR-10 configs, batch 128: the teacher step (configs/cifar10_teacher.py: dropout 0.2, EMA, as
#      the teacher trains), the plain and guided distill steps, the semantic step, and 1-step sampling at batch 1024
#      with and without the semantic predictor (configs/cifar10_stage.py). 20 timed calls after 3 warm-ups, as the
#      anchor's; then the consistency-distillation step of configs/cifar10_cd.py (Heun, guided), not yet run on a GPU,
#   3. the sharded == single-device step tests, on 4 fake CPU devices of the GPU image (one GPU cannot shard; this
#      checks the sharding code under the image's jax 0.11.2 / Python 3.12).
# Run from the repository root:  bash bench/gpu_check.sh
# The GPU image has no ml_collections: carry it as a wheel in .whl/ (git ignores it). Fetch it here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml-collections==1.1.0
# and name .whl in the device tool's carry; the script installs .whl/*.whl into /tmp/site and puts that on
# PYTHONPATH. Everything goes to $OUT (a temporary folder when unset): gpu_check.log, bench_cifar10.jsonl,
# bench_cifar10.md (its table), nvidia_smi.txt. On one H200 (2026-11-26) it passed in 377 s, compiles 40-50 s each;
# its numbers are in the README and bench/results/. Each stage has its own time limit, together 700 s: give the
# device tool timeout_s=600 (the last stage, the CPU tests, may be cut: they also run in CI).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$(mktemp -d)}
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
failed=()

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# stage NAME SECONDS COMMAND...: runs the command under a time limit, its output into the log; notes a failure.
stage() {
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (limit ${seconds}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed+=("$name (rc $rc)")
}

nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
stage versions 30 python3 -c 'import jax, flax, optax, ml_collections; print(jax.__version__, flax.__version__,
optax.__version__, jax.devices())'

WORK=$(mktemp -d)
stage train_smoke 90 python3 -m sferd_jax.main --config=configs/tiny.py --workdir="$WORK/tiny" --mode=train_teacher
stage train_smoke_summary 10 python3 -c "import json, math, sys; s = json.load(open(sys.argv[1])); print(s);
assert math.isfinite(s['final_loss']) and s['gflop_per_step']" "$WORK/tiny/teacher/summary.json"

JSONL="$OUT/bench_cifar10.jsonl"
COMMON=(--batch_size=128 --steps=20 --warmup=3 --out="$JSONL")
stage bench_teacher 100 python3 bench/bench.py --config=configs/cifar10_teacher.py --only=teacher "${COMMON[@]}"
stage bench_stage 300 python3 bench/bench.py --config=configs/cifar10_stage.py --only=guided,semantic,sample \
  --sample_batch_size=1024 "${COMMON[@]}"
stage bench_cd 90 python3 bench/bench.py --config=configs/cifar10_cd.py --only=consistency "${COMMON[@]}"
if [ -s "$JSONL" ]; then
  python3 bench/bench.py --summarize="$JSONL" | tee "$OUT/bench_cifar10.md"
fi

stage sharded_tests 80 env JAX_PLATFORMS=cpu python3 -m pytest -q -x -p no:cacheprovider -n 2 \
  tests/test_training.py::test_sharded_teacher_step_equals_single_device \
  tests/test_guided_distill.py::test_guided_distill_step_sharded_equals_single_device

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all stages passed" | tee -a "$LOG"
