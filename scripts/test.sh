#!/usr/bin/env bash
# Runs the test suite in the current (activated) environment. The compiled op library must have
# been built (pip install --no-build-isolation -e .): a missing library fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export FASP_EXT_REQUIRE_COMPILED=1
exec python -m pytest -q -rs tests "$@"  # -rs: every skip with its reason, so an unexpected one shows
