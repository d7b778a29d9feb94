#!/usr/bin/env bash
# Reproduce every benchmark table and plot into bench/results (CPU by default; DEVICE=cuda on a GPU).
# Run after `bash scripts/setup_and_test.sh` (or inside any venv with fasp_ext built):
#   bash bench/run_all.sh
# Takes a while on a small CPU (the quality comparison prunes SmolLM2-135M many times).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
DEVICE=${DEVICE:-cpu}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
python bench/bench_ops.py --device "$DEVICE"
python bench/bench_e2e.py --device "$DEVICE"
python bench/bench_inference.py --device "$DEVICE"
python -m fasp_ext compare --model smollm2 --device "$DEVICE" --quiet \
  --methods magnitude wanda-sp fasp --sparsities 0.1 0.2 0.3 \
  --calib austen:emma --eval austen:prideprejudice jargon --nsamples 128 --seqlen 512 --eval-windows 64 \
  --out bench/results --stem compare
python bench/plots.py
