#!/usr/bin/env bash
# Issue #9's figures on one GPU: the benches named, one after another, in one call that stays
# inside BUDGET seconds (default 560: the device tool allows 600 s a command):
#
#   bash bench/gpu_figures.sh sample      # bench_sample.py batch 1 and 4 (~5 min), then bench_encode.py (~2-3 min)
#   bash bench/gpu_figures.sh train       # bench_train.py (~4-6 min), then bench_train.py --memory (~2 min)
#   bash bench/gpu_figures.sh unet_step   # the U-Net step as each fast path is added (~4 min)
#   bash bench/gpu_figures.sh train_ablation   # training, the fast paths added one at a time (~6-8 min)
#
# A name is a bench (sample encode train memory unet_step train_ablation) or a part: sample =
# sample + encode, train = train + memory, ablation = unet_step + train_ablation (more than one
# call's time). Each bench runs under its own limit, cut to what is left of BUDGET; one that
# fails, overruns or finds no time left is recorded, and the next still runs. Writes
# $OUT/<names>.json (each bench's figures under its name; default OUT=out/gpu) and
# $OUT/<names>.log; the benches print their figures as they go, so an overrun keeps what was
# measured. On a machine without diffusers or open_clip, run bench/gpu_wheels.sh where pip works
# and bring .whl/ along: where they are missing, this installs them into /tmp/site first.
# TINY=1 runs the same at CPU size (a dry run of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
(( $# )) || { echo "name the benches: sample encode train memory unet_step train_ablation (or a part: sample train ablation)" >&2; exit 2; }
label=$(IFS=-; echo "$*")
names=()
for name in "$@"; do
  case $name in
    sample) add=(sample encode) ;;
    train) add=(train memory) ;;
    ablation) add=(unet_step train_ablation) ;;
    encode|memory|unet_step|train_ablation) add=("$name") ;;
    *) echo "unknown bench $name: sample encode train memory unet_step train_ablation" >&2; exit 2 ;;
  esac
  for bench in "${add[@]}"; do [[ " ${names[*]} " == *" $bench "* ]] || names+=("$bench"); done  # each once
done
BUDGET=${BUDGET:-560}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import diffusers, open_clip" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$OUT/$label.log"
each=$(mktemp -d)  # one JSON per bench, merged into $OUT/$label.json at the end
tiny=()
[[ "${TINY:-0}" == 1 ]] && tiny=(--tiny --cpu)

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, diffusers, transformers, accelerate, open_clip; print('torch', torch.__version__, '| diffusers',
diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"; } >"$log" 2>&1

bench() {  # bench NAME SECONDS SCRIPT ARGS...: one bench under its limit, cut to what is left of BUDGET
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 10)) t0=$SECONDS
  (( limit > left )) && limit=$left
  if (( limit < 30 )); then
    echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left" >>"$log"
    echo "{\"error\": \"skipped: no time left in the budget of $BUDGET s\"}" >"$each/$name.json"
    return
  fi
  echo "== $name (limit $limit s): $*" >>"$log"
  timeout --kill-after=10 "$limit" $PY "$@" "${tiny[@]}" --json "$each/$name.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" >>"$log"
  local rc=${PIPESTATUS[0]}
  local why="exit $rc after $((SECONDS - t0)) s"
  [[ $rc == 124 || $rc == 137 ]] && why+=", over its limit of $limit s"
  echo "== $name: $why" >>"$log"
  [[ $rc == 0 ]] || echo "{\"error\": \"$why\"}" >"$each/$name.json"
}

for name in "${names[@]}"; do
  case $name in
    sample) bench sample 420 bench/bench_sample.py --batch-sizes 1 4 ;;
    encode) bench encode 240 bench/bench_encode.py ;;
    train) bench train 420 bench/bench_train.py ;;
    memory) bench memory 200 bench/bench_train.py --memory ;;
    unet_step) bench unet_step 300 bench/bench_sample.py --ablation ;;
    train_ablation) bench train_ablation 540 bench/bench_train.py --ablation ;;
  esac
done

# one file of figures per call
$PY - "$each" "$OUT/$label.json" <<'EOF'
import json, sys
from pathlib import Path
each, merged = Path(sys.argv[1]), Path(sys.argv[2])
merged.write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(each.glob("*.json"))}, indent=1))
EOF
cat "$log"
