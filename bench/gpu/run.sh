#!/usr/bin/env bash
# The benchmarks on a GPU machine, in one bounded run (about 6 minutes on an H200 box, BUDGET_S
# = 480 s at most), issue 16's figures first:
#   install the carried wheels -> GPU and versions -> import smoke check (fail fast) ->
#   bench/data_plane.py: /predict through the data plane, ViT-B-16 BF16, at 0.3 MP and 12 MP
#     (img/s, ÷ encoder-only, /health p99, GPU utilisation) ->
#   bench/gpu/decode_compare.py: CPU decode processes against nvJPEG, img/s ->
#   tests/images/test_gpu_decode.py on CUDA ->
#   encoder-only img/s per batch size (bench/gpu/encoder_sweep.py) ->
#   bench/predict_throughput.py at 0.3 MP (backend, encoder, naive, re-score; ViT-B-32) ->
#   bench/load.py (/predict, /webhook and /health latencies under 50 clients).
#
#   bash bench/gpu/fetch_wheels.sh      # once, on a machine with a package registry: fills .whl/
#   bash bench/gpu/run.sh               # on the GPU machine, from the repository root
#
# Everything goes to $OUT/gpu_bench.log (OUT defaults to ./gpu-bench-out) and a summary, the
# result lines under each step's name, to $OUT/gpu_summary.txt. A step that fails or runs out of
# time is reported and the next one runs; the exit status is 1 when any step failed. While each
# step runs, nvidia-smi samples the GPU's utilisation every 200 ms ("gpu util:" after the step;
# nothing where nvidia-smi is absent). Knobs (environment): BENCH_DEVICE (cuda; cpu = a short
# rehearsal with tiny sizes), BUDGET_S (overall seconds, 480), PYTHON (python3), WHEELS (.whl),
# SITE (/tmp/site), TESTBED_CACHE (.testbed-cache), and the sizes below.
# shellcheck disable=SC2329,SC2012 # functions run through `step`; ls lists our own names
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$PWD

BENCH_DEVICE=${BENCH_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-$ROOT/gpu-bench-out}
BUDGET_S=${BUDGET_S:-480}
if [[ $BENCH_DEVICE == cpu ]]; then   # rehearsal: the same steps, minutes shorter
  : "${DP_MODEL:=ViT-B-32}" "${DP_PRECISION:=fp32}" "${DP_CLIENTS:=2}" "${DP_TASKS:=8}"
  : "${DP_SMALL_IMAGES:=48}" "${DP_LARGE_IMAGES:=16}" "${DP_SECONDS:=4}" "${DP_ENCODER_SECONDS:=1}"
  : "${LARGE_MP:=2}" "${DC_BATCH:=8}" "${DC_SECONDS:=1}"
  : "${BATCH:=8}" "${SMALL_IMAGES:=16}" "${REPEAT:=1}"
  : "${LOAD_SECONDS:=5}" "${LOAD_CLIENTS:=4}" "${LOAD_MODEL:=}"
  : "${SWEEP_MODELS:=ViT-B-32}" "${SWEEP_BATCHES:=1 8}" "${SWEEP_SECONDS:=0.3}"
  : "${SCALE_PROCESSES:=1 2}" "${SCALE_IMAGES:=600}" "${SCALE_SECONDS:=3}" "${SCALE_CLIENTS:=8}"
else
  : "${DP_MODEL:=ViT-B-16}" "${DP_PRECISION:=bf16}" "${DP_CLIENTS:=16}" "${DP_TASKS:=64}"
  : "${DP_SMALL_IMAGES:=24000}" "${DP_LARGE_IMAGES:=2400}" "${DP_SECONDS:=8}"
  : "${DP_ENCODER_SECONDS:=3}" "${LARGE_MP:=12}" "${DC_BATCH:=64}" "${DC_SECONDS:=3}"
  : "${BATCH:=64}" "${SMALL_IMAGES:=512}" "${REPEAT:=3}"
  : "${LOAD_SECONDS:=20}" "${LOAD_CLIENTS:=50}" "${LOAD_MODEL:=ViT-B-32}"
  : "${SWEEP_MODELS:=ViT-B-16 ViT-B-32 ViT-L-14}" "${SWEEP_BATCHES:=1 8 64 256}"
  : "${SWEEP_SECONDS:=1.5}"
  : "${SCALE_PROCESSES:=1 2 4 8 16}" "${SCALE_IMAGES:=8000}" "${SCALE_SECONDS:=4}"
  : "${SCALE_CLIENTS:=32}"
fi
# DECODE_PROCESSES of the data-plane runs: unset = the backend's default, one per CPU
: "${DP_PROCESSES:=unset}"
CPUS=$(nproc)

export DEVICE=$BENCH_DEVICE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=${HF_HOME:-/tmp/gpu-bench-hf} PIP_DISABLE_PIP_VERSION_CHECK=1
export FETCH_CONCURRENCY=${FETCH_CONCURRENCY:-32}
export TESTBED_CACHE=${TESTBED_CACHE:-$ROOT/.testbed-cache}
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
LOG=$OUT/gpu_bench.log
SUMMARY=$OUT/gpu_summary.txt
STARTED=$SECONDS
GPU_SMI=$(command -v nvidia-smi || true)
STEP_NO=0

# step NAME LIMIT_S COMMAND...: runs COMMAND (a program or an exported function) under
# `timeout`, within what is left of BUDGET_S, with the GPU sampled meanwhile; prints
# "=== NAME: rc=N in Ts" for the summary
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
  local begun=$SECONDS rc samples="" sampler=""
  if [[ -n $GPU_SMI ]]; then
    STEP_NO=$((STEP_NO + 1))
    samples=$OUT/gpu-util-$STEP_NO.csv
    "$GPU_SMI" --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits \
      -lms 200 > "$samples" 2>/dev/null &
    sampler=$!
  fi
  # SIGINT first, to the whole process group: Python unwinds (servers stopped, a traceback
  # shows where it was); SIGKILL 15 s later
  timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@"
  rc=$?
  if [[ -n $sampler ]]; then
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    gpu_util "$samples"
  fi
  local why=""
  ((rc == 124 || rc == 137)) && why=" (TIMED OUT: limit ${limit}s)"
  echo "=== $name: rc=$rc in $((SECONDS - begun))s$why"
  return "$rc"
}

# gpu_util FILE: nvidia-smi's samples (utilisation %, memory MiB per line) in one line
gpu_util() {
  awk -F', *' '$1 ~ /^[0-9.]+$/ {print $1, $2}' "$1" | sort -n | awk '
    { util[NR] = $1; sum += $1; if ($2 > memory) memory = $2 }
    END {
      if (NR == 0) { print "gpu util: no samples"; exit }
      printf "gpu util: mean %.0f %%, p50 %.0f %%, max %.0f %%; memory used max %d MiB " \
             "(%d samples, 200 ms apart, the whole step)\n",
             sum / NR, util[int((NR + 1) / 2)], util[NR], memory, NR
    }'
}

# fresh state per bench: an earlier run's embedding cache would turn encodes into re-scores
fresh_model_dir() { mktemp -d "${TMPDIR:-/tmp}/gpu-bench-model-dir.XXXXXX"; }

data_plane() {  # data_plane MEGAPIXELS IMAGES
  # shellcheck disable=SC2086 # DP_PROCESSES may list several values
  "$PYTHON" bench/data_plane.py --model "$DP_MODEL" --device "$BENCH_DEVICE" \
    --precision "$DP_PRECISION" --megapixels "$1" --images "$2" --seconds "$DP_SECONDS" \
    --clients "$DP_CLIENTS" --tasks-per-request "$DP_TASKS" --processes $DP_PROCESSES \
    --encoder-seconds "$DP_ENCODER_SECONDS" --no-install
}

plane_scaling() {  # the CPU proxy (tiny model on the CPU) per number of decode processes
  # shellcheck disable=SC2086 # SCALE_PROCESSES lists several values
  "$PYTHON" bench/data_plane.py --device cpu --processes $SCALE_PROCESSES \
    --images "$SCALE_IMAGES" --seconds "$SCALE_SECONDS" --clients "$SCALE_CLIENTS" --no-install
}

decode_compare() {
  "$PYTHON" bench/gpu/decode_compare.py --device "$BENCH_DEVICE" --megapixels 0.3 "$LARGE_MP" \
    --batch "$DC_BATCH" --seconds "$DC_SECONDS"
}

gpu_decode_tests() {
  local select=()
  if ! compgen -G "$TESTBED_CACHE/micro-clip-*.pt" >/dev/null; then
    echo "no micro-CLIP testbed in $TESTBED_CACHE (carry .testbed-cache): its top-1 tests" \
      "(marked slow, minutes to train) are left out"
    select=(-m "not slow")
  fi
  "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${select[@]}" tests/images/test_gpu_decode.py
}

throughput() {  # throughput IMAGES MEGAPIXELS
  MODEL_DIR=$(fresh_model_dir) "$PYTHON" bench/predict_throughput.py --model ViT-B-32 \
    --batch "$BATCH" --images "$1" --megapixels "$2" --repeat "$REPEAT" --device "$BENCH_DEVICE"
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
  echo "CPUs $CPUS, memory $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')," \
    "$(df -h "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR == 2 {print $4 " free in " $6}')"
  local nginx
  nginx=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
  echo "nginx: ${nginx:-not here: bench/data_plane.py serves its images from a Python asyncio" \
    "server (more CPU per image, counted in its 'images' column)}"
  if [[ -n $GPU_SMI ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv || true
    nvidia-smi || true
  else
    echo "nvidia-smi: not here (no GPU utilisation sampled)"
  fi
  ls "$TESTBED_CACHE" 2>/dev/null | sed 's/^/  testbed cache: /' || true
  "$PYTHON" -c 'import os, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"cuda available {torch.cuda.is_available()}, torch threads {torch.get_num_threads()}")
print({k: os.environ.get(k) for k in ("DEVICE", "DECODE_PROCESSES", "FETCH_CONCURRENCY",
                                       "TESTBED_CACHE", "PYTHONPATH")})'
}

export BENCH_DEVICE PYTHON WHEELS SITE OUT BATCH SMALL_IMAGES LARGE_MP REPEAT LOAD_SECONDS \
  LOAD_CLIENTS LOAD_MODEL CPUS GPU_SMI TESTBED_CACHE DP_MODEL DP_PRECISION DP_CLIENTS DP_TASKS \
  DP_SECONDS DP_ENCODER_SECONDS DP_PROCESSES DC_BATCH DC_SECONDS SCALE_PROCESSES SCALE_IMAGES \
  SCALE_SECONDS SCALE_CLIENTS
export -f fresh_model_dir data_plane plane_scaling decode_compare gpu_decode_tests throughput \
  load_bench install_wheels machine_info

main() {
  echo "GPU bench: device $BENCH_DEVICE, budget ${BUDGET_S}s; data plane $DP_MODEL" \
    "$DP_PRECISION, $DP_SMALL_IMAGES x 0.3 MP and $DP_LARGE_IMAGES x $LARGE_MP MP, up to" \
    "${DP_SECONDS}s each, $DP_CLIENTS clients x $DP_TASKS tasks, DECODE_PROCESSES" \
    "$DP_PROCESSES; decode compare batch $DC_BATCH; throughput batch $BATCH, $SMALL_IMAGES" \
    "images x $REPEAT; load ${LOAD_SECONDS}s x $LOAD_CLIENTS clients; sweep [$SWEEP_MODELS]" \
    "x [$SWEEP_BATCHES]"
  step "install wheels" 120 install_wheels || { echo "ABORT: wheels not installed"; return 1; }
  step "machine" 60 machine_info
  if ! step "import smoke check" 150 "$PYTHON" bench/gpu/check_imports.py \
      --device "$BENCH_DEVICE" --site "$SITE"; then
    echo "ABORT: the smoke check failed; the benches would fail the same way (see above)"
    return 1
  fi
  # issue 16 first
  step "data plane 0.3 MP" 120 data_plane 0.3 "$DP_SMALL_IMAGES"
  step "data plane $LARGE_MP MP" 150 data_plane "$LARGE_MP" "$DP_LARGE_IMAGES"
  step "decode compare" 100 decode_compare
  step "GPU decode tests" 120 gpu_decode_tests
  step "plane scaling (CPU proxy)" 150 plane_scaling
  # then the figures of earlier runs, as far as the budget goes
  # shellcheck disable=SC2086 # word splitting of the lists is wanted
  step "encoder-only sweep" 90 "$PYTHON" bench/gpu/encoder_sweep.py --device "$BENCH_DEVICE" \
    --models $SWEEP_MODELS --batches $SWEEP_BATCHES --seconds "$SWEEP_SECONDS"
  step "predict throughput 0.3 MP" 120 throughput "$SMALL_IMAGES" 0.3
  step "load (/health p99)" 100 load_bench
  return 0
}

RESULTS='^(images: |limit: |encoder-only|/predict |GPU during |DECODE_PROCESSES |unset |gpu util|'
RESULTS+='decode |[0-9]+ (passed|failed|skipped|deselected|errors?)|smoke check:|MISSING|model |'
RESULTS+='  ViT| *[0-9.]+ MP \(|load: |route |/webhook |/health |PASS|FAIL|scaling: |'
RESULTS+='[0-9]+ +[0-9]+\.[0-9]+ +[0-9]+\.[0-9]+ )'

summary() {
  echo
  echo "=== summary (${BENCH_DEVICE}, $((SECONDS - STARTED))s in all)"
  # the result lines, under the name of the step that printed them
  awk -v results="$RESULTS" '
    /^=== .* \(limit [0-9]+s, t=[0-9]+s\): / {
      name = $0; sub(/^=== /, "", name); sub(/ \(limit [0-9]+s, t=.*/, "", name); shown = 0
      next
    }
    /^=== / { next }
    $0 ~ results { if (!shown) { print "-- " name; shown = 1 } print }
  ' "$LOG"
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
