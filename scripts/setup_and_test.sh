#!/usr/bin/env bash
# The one test command (README, CI): create or reuse a virtual environment, install torch and the
# test/runtime dependencies, build the compiled op library, run the tests.
#
#   bash scripts/setup_and_test.sh [extra pytest args]
#
# Environment: FASP_VENV (default .venv), PYTHON (default python3), FASP_TORCH (default
# torch==2.13.0, the CPU build), MAX_JOBS (parallel compile jobs, default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FASP_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${FASP_TORCH:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

step() { echo "=== [setup_and_test] $* ($(date +%H:%M:%S))"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

step "installing $TORCH_SPEC and dependencies"
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q numpy pytest ninja setuptools wheel \
  "transformers==5.23.*" accelerate safetensors tqdm gguf matplotlib

# ---------------------------------------------------------------------------------------------
# HOOK: extra setup steps (e.g. fetching text / model fixtures for the data and model tests).
# Add lines here; they run inside the activated venv, from the repository root.
# ---------------------------------------------------------------------------------------------

step "building the op library (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install -q --no-build-isolation -e .
python -c 'import fasp_ext, json; print(json.dumps(fasp_ext.build_info(), indent=1))'

step "running the tests"
bash scripts/test.sh "$@"
step "done"
