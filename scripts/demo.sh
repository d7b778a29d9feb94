#!/usr/bin/env bash
# The demo: set up (scripts/setup.sh), then prune the embedded SmolLM2-135M-Instruct at 20 % on
# Jane Austen's Emma and print perplexity before/after on Pride and Prejudice and on the Jargon
# File, parameters, sizes and time; the pruned model goes to fasp_demo_out/.
#
#   bash scripts/demo.sh [fasp-ext demo options, e.g. --sparsity 0.3 --nsamples 128]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${FASP_VENV:-.venv}/bin/activate"
exec fasp-ext demo --overwrite "$@"
