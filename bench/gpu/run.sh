#!/usr/bin/env bash
# The benchmarks on a GPU machine, in one bounded run (about 5 minutes on an H200 box):
#   install the carried wheels -> GPU and versions -> import smoke check (fail fast) ->
#   bench/predict_throughput.py at 0.3 MP and 12 MP -> bench/load.py (/health p99 under load) ->
#   encoder-only img/s per batch size (bench/gpu/encoder_sweep.py).
#
#   bash bench/gpu/fetch_wheels.sh      # once, on a machine with a package registry: fills .whl/
#   bash bench/gpu/run.sh               # on the GPU machine, from the repository root
#
# Everything goes to $OUT/gpu_bench.log (OUT defaults to ./gpu-bench-out) and a summary to
# $OUT/gpu_summary.txt. A step that fails or runs out of time is reported and the next one runs;
# the exit status is 1 when any step failed. Knobs (environment): BENCH_DEVICE (cuda; cpu = a
# short rehearsal with tiny sizes), BUDGET_S (overall seconds, 420), PYTHON (python3), WHEELS
# (.whl), SITE (/tmp/site), and the sizes below.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$PWD

BENCH_DEVICE=${BENCH_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-$ROOT/gpu-bench-out}
BUDGET_S=${BUDGET_S:-420}
if [[ $BENCH_DEVICE == cpu ]]; then   # rehearsal: the same steps, minutes shorter
  : "${BATCH:=8}" "${SMALL_IMAGES:=16}" "${LARGE_IMAGES:=4}" "${LARGE_MP:=2}" "${REPEAT:=1}"
  : "${LOAD_SECONDS:=5}" "${LOAD_CLIENTS:=4}" "${LOAD_MODEL:=}"
  : "${SWEEP_MODELS:=ViT-B-32}" "${SWEEP_BATCHES:=1 8}" "${SWEEP_SECONDS:=0.3}"
else
  : "${BATCH:=64}" "${SMALL_IMAGES:=512}" "${LARGE_IMAGES:=48}" "${LARGE_MP:=12}" "${REPEAT:=3}"
  : "${LOAD_SECONDS:=20}" "${LOAD_CLIENTS:=50}" "${LOAD_MODEL:=ViT-B-32}"
  : "${SWEEP_MODELS:=ViT-B-32 ViT-L-14}" "${SWEEP_BATCHES:=1 8 64 256}" "${SWEEP_SECONDS:=1.5}"
fi
CPUS=$(nproc)

export DEVICE=$BENCH_DEVICE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=${HF_HOME:-/tmp/gpu-bench-hf} PIP_DISABLE_PIP_VERSION_CHECK=1
export DECODE_THREADS=${DECODE_THREADS:-$CPUS} FETCH_CONCURRENCY=${FETCH_CONCURRENCY:-32}
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
LOG=$OUT/gpu_bench.log
SUMMARY=$OUT/gpu_summary.txt
STARTED=$SECONDS

# step NAME LIMIT_S COMMAND...: runs COMMAND (a program or an exported function) under
# `timeout`, within what is left of BUDGET_S; prints "=== NAME: rc=N in Ts" for the summary
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - STARTED) - 10))
  if ((left < 20)); then
    echo "=== $name: SKIPPED (budget of ${BUDGET_S}s spent)"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo
  echo "=== $name (limit ${limit}s, t=$((SECONDS - STARTED))s): $*"
  local begun=$SECONDS rc
  # SIGINT first, to the whole process group: Python unwinds (servers stopped, a traceback
  # shows where it was); SIGKILL 15 s later
  timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@"
  rc=$?
  local why=""
  ((rc == 124 || rc == 137)) && why=" (TIMED OUT: limit ${limit}s)"
  echo "=== $name: rc=$rc in $((SECONDS - begun))s$why"
  return "$rc"
}

# fresh state per bench: an earlier run's embedding cache would turn encodes into re-scores
fresh_model_dir() { mktemp -d "${TMPDIR:-/tmp}/gpu-bench-model-dir.XXXXXX"; }

throughput() {  # throughput IMAGES MEGAPIXELS
  local device_flag=()
  if grep -q -- '"--device"' bench/predict_throughput.py; then  # else DEVICE (exported) holds
    device_flag=(--device "$BENCH_DEVICE")
  fi
  MODEL_DIR=$(fresh_model_dir) "$PYTHON" bench/predict_throughput.py --model ViT-B-32 \
    --batch "$BATCH" --images "$1" --megapixels "$2" --repeat "$REPEAT" "${device_flag[@]}"
}

load_bench() {
  local model_flag=()
  [[ -n $LOAD_MODEL ]] && model_flag=(--model "$LOAD_MODEL")
  MODEL_DIR=$(fresh_model_dir) "$PYTHON" bench/load.py "${model_flag[@]}" \
    --seconds "$LOAD_SECONDS" --clients "$LOAD_CLIENTS" --log "$OUT/load_backend.log"
}

install_wheels() {
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "no wheels in $WHEELS/: run bench/gpu/fetch_wheels.sh first, and carry .whl"
    return 1
  fi
  ls "$WHEELS" | sed 's/^/  /'
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
}

machine_info() {
  date -u
  echo "repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -c . || true) changed files"
  echo "CPUs $CPUS, memory $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv || true
    nvidia-smi || true
  else
    echo "nvidia-smi: not here"
  fi
  "$PYTHON" -c 'import os, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"cuda available {torch.cuda.is_available()}, torch threads {torch.get_num_threads()}")
print({k: os.environ.get(k) for k in ("DEVICE", "DECODE_THREADS", "FETCH_CONCURRENCY",
                                       "PYTHONPATH")})'
}

export BENCH_DEVICE PYTHON WHEELS SITE OUT BATCH SMALL_IMAGES LARGE_IMAGES LARGE_MP REPEAT \
  LOAD_SECONDS LOAD_CLIENTS LOAD_MODEL CPUS
export -f fresh_model_dir throughput load_bench install_wheels machine_info

main() {
  echo "GPU bench: device $BENCH_DEVICE, batch $BATCH, images $SMALL_IMAGES x 0.3 MP and" \
    "$LARGE_IMAGES x $LARGE_MP MP, $REPEAT runs each, load ${LOAD_SECONDS}s x $LOAD_CLIENTS" \
    "clients, sweep [$SWEEP_MODELS] x [$SWEEP_BATCHES], budget ${BUDGET_S}s"
  step "install wheels" 120 install_wheels || { echo "ABORT: wheels not installed"; return 1; }
  step "machine" 60 machine_info
  if ! step "import smoke check" 150 "$PYTHON" bench/gpu/check_imports.py \
      --device "$BENCH_DEVICE" --site "$SITE"; then
    echo "ABORT: the smoke check failed; the benches would fail the same way (see above)"
    return 1
  fi
  step "predict throughput 0.3 MP" 150 throughput "$SMALL_IMAGES" 0.3
  step "predict throughput $LARGE_MP MP" 180 throughput "$LARGE_IMAGES" "$LARGE_MP"
  step "load (/health p99)" 100 load_bench
  # shellcheck disable=SC2086 # word splitting of the lists is wanted
  step "encoder-only sweep" 150 "$PYTHON" bench/gpu/encoder_sweep.py --device "$BENCH_DEVICE" \
    --models $SWEEP_MODELS --batches $SWEEP_BATCHES --seconds "$SWEEP_SECONDS"
  return 0
}

summary() {
  echo
  echo "=== summary (${BENCH_DEVICE}, $((SECONDS - STARTED))s in all)"
  grep -hE '^(model |encoder-only|  ViT| *[0-9.]+ MP \(|load: |route |/predict |/webhook |/health |PASS|FAIL)' \
    "$LOG" | grep -v '^=== ' || true
  printf '%s\n' "${STATUS[@]}"
}

: > "$LOG"
main 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
# the steps ran in the pipeline's subshell: read their results back from the log
mapfile -t STATUS < <(grep -E '^=== .*(: rc=[0-9]+ in |: SKIPPED)' "$LOG" | sed 's/^=== //')
summary > "$SUMMARY"  # read from the log first, then appended to it
tee -a "$LOG" < "$SUMMARY"
failed=$(grep -cvE ': rc=0 in ' <<<"$(printf '%s\n' "${STATUS[@]}")")
((rc == 0 && failed == 0)) && exit 0
exit 1
