#!/usr/bin/env bash
# The one test command (README, CI): set up the virtual environment (scripts/setup.sh: torch,
# dependencies, the op library, texts, the embedded model), then run the whole test suite with
# the compiled library, the texts and the real model required (nothing skips for lack of them).
#
#   bash scripts/setup_and_test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${FASP_VENV:-.venv}/bin/activate"
export FASP_EXT_REQUIRE_DATA=1 FASP_EXT_REQUIRE_MODEL=1
echo "=== [setup_and_test] running the tests ($(date +%H:%M:%S))"
bash scripts/test.sh "$@"
