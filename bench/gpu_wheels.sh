#!/usr/bin/env bash
# Fetch into .whl/ (git ignores it) the wheels that a GPU machine with torch, transformers and
# accelerate but no registry needs to run bench/gpu_figures.sh: Python 3.12, x86-64, no
# dependencies resolved (each one is named). 51 MB, 43 of them bitsandbytes (the 8-bit AdamW
# rows of bench_train.py --memory); BNB=0 leaves it out. peft is there for the LoRA rows, in
# case the machine's own is older than diffusers needs.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 torchsde==0.2.6 trampoline==0.1.2 peft==0.21.2)
[[ "${BNB:-1}" == 1 ]] && WHEELS+=(bitsandbytes==0.50.2)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
