#!/usr/bin/env bash
# Issue #9's figures on one GPU, in parts that each end well inside ten minutes:
#
#   bash bench/gpu_figures.sh sample     # bench_sample.py (batch 1 and 4), then bench_encode.py   (~5 min)
#   bash bench/gpu_figures.sh train      # bench_train.py, then bench_train.py --memory            (~5 min)
#   bash bench/gpu_figures.sh ablation   # the U-Net step and the training ablations               (~8 min)
#
# Writes $OUT/<part>.json (each bench's figures under its name; default OUT=out/gpu) and
# $OUT/<part>.log. A bench that fails or outruns its time limit is recorded in both, and the next
# one still runs. On a machine without diffusers or open_clip, run bench/gpu_wheels.sh where pip
# works and bring .whl/ along: where they are missing, this installs them into /tmp/site first.
# TINY=1 runs the same at CPU size (a dry run of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?"which part: sample | train | ablation"}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import diffusers, open_clip" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$OUT/$part.log"
each=$(mktemp -d)  # one JSON per bench, merged into $OUT/$part.json at the end
tiny=()
[[ "${TINY:-0}" == 1 ]] && tiny=(--tiny --cpu)

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, diffusers, transformers, accelerate, open_clip; print('torch', torch.__version__, '| diffusers',
diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"; } >"$log" 2>&1

bench() {  # bench NAME SECONDS SCRIPT ARGS...: one bench under a time limit
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" >>"$log"
  timeout --kill-after=10 "$limit" $PY "$@" "${tiny[@]}" --json "$each/$name.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" >>"$log"
  local rc=${PIPESTATUS[0]}
  local why="exit $rc after $((SECONDS - t0)) s"
  [[ $rc == 124 || $rc == 137 ]] && why+=", over its limit of $limit s"
  echo "== $name: $why" >>"$log"
  [[ $rc == 0 ]] || echo "{\"error\": \"$why\"}" >"$each/$name.json"
}

case $part in
  sample) bench sample 300 bench/bench_sample.py --batch-sizes 1 4
          bench encode 120 bench/bench_encode.py ;;
  train) bench train 300 bench/bench_train.py
         bench memory 200 bench/bench_train.py --memory ;;
  ablation) bench unet_step 240 bench/bench_sample.py --ablation
            bench train_ablation 300 bench/bench_train.py --ablation ;;
  *) echo "unknown part $part: sample | train | ablation" >&2; exit 2 ;;
esac

# one file of figures per part
$PY - "$each" "$OUT/$part.json" <<'EOF'
import json, sys
from pathlib import Path
each, merged = Path(sys.argv[1]), Path(sys.argv[2])
merged.write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(each.glob("*.json"))}, indent=1))
EOF
cat "$log"
