#!/usr/bin/env bash
# Reproduce every benchmark table and plot of docs/results.md into bench/results (CPU by default;
# DEVICE=cuda on a GPU; bench/gpu_check.sh makes the GPU files). Run after
# `bash scripts/setup_and_test.sh` (or inside any venv with fasp_ext built):
#   bash bench/run_all.sh
# Takes hours on a small CPU (the quality comparisons prune SmolLM2-135M many times). The timings
# wait for a quiet machine (bench/quiet.py). The screens behind docs/decisions.md are in
# bench/results/screens/, each with its own commands; bench/results/INDEX.md names every file's
# command and commit (python bench/index_results.py rewrites it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
DEVICE=${DEVICE:-cpu}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
Q="python bench/quiet.py --"
$Q python bench/bench_ops.py --device "$DEVICE"
if [ "$DEVICE" = cpu ]; then
  $Q python bench/bench_gram.py
  $Q python bench/bench_gram_backends.py
  $Q python bench/bench_scaling.py  # docs/memory.md: --lazy on synthetic checkpoints, 1x2 and 2x1
fi
# end-to-end time against one dense forward, at 128 and at 32 calibration windows, with the
# replanning option interleaved (docs/results.md: Pruning time)
$Q python bench/bench_e2e.py --device "$DEVICE" --models smollm2 --nsamples 128 --repeats 2 \
  --variant allocation_replan,allocation_samples=4
$Q python bench/bench_e2e.py --device "$DEVICE" --models smollm2 --nsamples 32 --repeats 3 \
  --variant allocation_replan,allocation_samples=4 --stem "e2e_${DEVICE}_32"
$Q python bench/bench_inference.py --device "$DEVICE"
# baselines and FASP at 10/20/30 % (docs/results.md's quality tables). A bare method name takes that
# method's own allocation (error curves for fasp, FLAP's ranking for flap, uniform for the others).
python -m fasp_ext compare --model smollm2 --device "$DEVICE" --quiet \
  --methods magnitude wanda-sp flap:allocation=uniform flap depth2 fasp:allocation=uniform fasp \
  --sparsities 0.1 0.2 0.3 \
  --calib austen:emma --eval austen:prideprejudice jargon --nsamples 128 --seqlen 512 --eval-windows 32 \
  --out bench/results --stem compare_smollm2
# screening of the stronger options at 30 % on a small calibration set
python -m fasp_ext compare --model smollm2 --device "$DEVICE" --quiet \
  --methods fasp:allocation=uniform fasp fasp:selection=obs,allocation=uniform fasp:selection=spap \
  fasp:allocation=uniform,selection=spap fasp:allocation=error fasp:allocation=error,selection=obs \
  fasp:damp=auto,allocation=uniform fasp:intercept=true,allocation=uniform fasp:target=dense,allocation=uniform \
  fasp:allocation=flap,target=dense flap:allocation=uniform flap depth2 depth2:allocation=flap --sparsities 0.3 \
  --calib austen:emma --eval austen:prideprejudice jargon --nsamples 32 --seqlen 512 --eval-windows 16 \
  --out bench/results --stem options30_screen_smollm2
# the promising options at full calibration
python -m fasp_ext compare --model smollm2 --device "$DEVICE" --quiet \
  --methods fasp:allocation=uniform fasp fasp:target=dense,allocation=uniform fasp:allocation=flap,target=dense \
  flap fasp:selection=spap fasp:allocation_samples=16 --sparsities 0.3 --calib austen:emma --eval austen:prideprejudice jargon --nsamples 128 --seqlen 512 \
  --eval-windows 32 --out bench/results --stem options30_smollm2

# Gemma3-270M: the baselines and FASP at 10/20/30 % (BOS first), then the settings screened at 20 %
python -m fasp_ext compare --model gemma3-270m --device "$DEVICE" --quiet --bos auto \
  --methods wanda-sp flap fasp:allocation=uniform fasp --sparsities 0.1 0.2 0.3 \
  --calib austen:emma --eval austen:prideprejudice jargon --nsamples 32 --seqlen 512 --eval-windows 16 \
  --out bench/results --stem compare_gemma3
python bench/compare_rows.py bench/results/compare_gemma3.json bench/results/compare_gemma3_screen.json \
  fasp:max_block_sparsity=0.4 fasp:max_block_sparsity=0.25 fasp:allocation_samples=16 fasp:one_pass \
  fasp:allocation=uniform,damp=auto fasp:damp=0.3 fasp:damp=1.0 fasp:allocation=uniform,mlp_only \
  fasp:allocation=uniform,mlp_sparsity=0.0 --sparsities 0.2
python bench/compare_rows.py bench/results/compare_smollm2.json bench/results/screen20_smollm2.json \
  fasp:allocation_samples=16 fasp:one_pass fasp:max_block_sparsity=0.25 --sparsities 0.2

python bench/magnitude_diagnosis.py
python bench/plots.py
