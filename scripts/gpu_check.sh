#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine, everything it measures written under $OUT.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh            # on a GPU machine, from the source tree
#   OUT=/tmp/gpu bash scripts/gpu_check.sh --dry-run  # on a CPU: every step at tiny sizes, to check the plumbing
#
# Steps (each under its own time limit, the whole within ~8 minutes on an H200):
#   1. bandwidth.json   a device read of >= 4 GB: the weight-read bandwidth, and the decode floor it
#                       gives (decoder weight bytes / bandwidth) for the benchmarked model
#   2. bench/           vlmrt bench on minigpt4-7b fp16, eager / compiled / hf, batch 1 and 10,
#                       256 new tokens, 40 text tokens: results.json/csv/png
#   3. pytest-gpu.log   pytest -m gpu -x -q
#   4. smoke.log        every tiny preset on cuda fp16, eager and compiled
#   5. summary.md       the figures against the targets (docs/bench.md), each decode row as a
#                       fraction of the bandwidth floor
# Without CUDA (and without --dry-run) it says so and exits 0 having run nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor  # inside the tree: a rerun on the same machine reuses it
PY=${PYTHON:-python3}

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if ! $PY -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; set PYTHON to an interpreter that has it." | tee "$OUT/summary.md"
  exit 1
fi
if [ $DRY = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was run." \
       "Run it on a GPU machine, or with --dry-run to check the steps on this CPU." | tee "$OUT/summary.md"
  exit 0
fi

if [ $DRY = 1 ]; then
  DEV=cpu; DT=fp32; MODEL=minigpt4-tiny; BATCH=1,2; NEW=8; GIB=0.25; REPEATS=1
  SMOKE_DEV="--device cpu --dtype fp32"
else
  DEV=cuda; DT=fp16; MODEL=minigpt4-7b; BATCH=1,10; NEW=256; GIB=4; REPEATS=3
  SMOKE_DEV="--device cuda --dtype fp16"
fi
START=$(date +%s)
budget() { # seconds left of the whole run's 8 minutes, at most $1
  local left=$(( 480 - ($(date +%s) - START) )); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/steps.log"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1

step "1. weight-read bandwidth"
timeout "$(budget 60)" $PY scripts/gpu_bandwidth.py --device $DEV --gib $GIB --model $MODEL --dtype $DT \
  --out "$OUT/bandwidth.json" 2>&1 | tee "$OUT/bandwidth.log"

step "2. bench $MODEL"
timeout "$(budget 300)" $PY -m vlmrt bench --model $MODEL --dtype $DT --device $DEV --runtime eager,compiled,hf \
  --batch $BATCH --new-tokens $NEW --prompt-tokens 40 --repeats $REPEATS --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"

step "3. pytest -m gpu"
if [ $DRY = 1 ]; then
  echo "(dry run: pytest -m gpu --collect-only)" > "$OUT/pytest-gpu.log"
  timeout "$(budget 60)" $PY -m pytest -m gpu --collect-only -q >> "$OUT/pytest-gpu.log" 2>&1
else
  timeout "$(budget 150)" $PY -m pytest -m gpu -x -q -p no:cacheprovider > "$OUT/pytest-gpu.log" 2>&1
fi
tail -3 "$OUT/pytest-gpu.log"

step "4. smoke: every tiny preset, eager and compiled"
: > "$OUT/smoke.log"
for preset in minigpt4-tiny minicpm-v-tiny qwen-vl-tiny slimm-tiny; do
  for rt in eager compiled; do
    echo "-- $preset $rt" >> "$OUT/smoke.log"
    timeout "$(budget 45)" $PY -m vlmrt run --model $preset --runtime $rt $SMOKE_DEV --max-new-tokens 16 \
      --image vlmrt/assets/astronaut.jpg --prompt "Describe this image." --json >> "$OUT/smoke.log" 2>&1
    echo "exit $?" >> "$OUT/smoke.log"
  done
done
grep -c "^exit 0" "$OUT/smoke.log" | sed 's/^/smoke runs that exited 0 (of 8): /'

step "5. summary"
$PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
echo "gpu_check: done in $(( $(date +%s) - START )) s; files in $OUT"
