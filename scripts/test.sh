#!/usr/bin/env bash
# Install, then run the whole test suite against the real server, engine and model.
#   bash scripts/test.sh            the whole suite (what CI runs)
#   bash scripts/test.sh --fast     the fast tier: no model, no vLLM, no real server (tests marked `model`
#                                   are deselected; see tests/conftest.py); a few minutes on 2 cores
# Any other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The suite needs 3.11 (asyncio.timeout); the package itself runs on 3.10 (pyproject's requires-python).
python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "the test suite needs Python >= 3.11" >&2; exit 2; }
if [ "${1:-}" = "--fast" ]; then
  shift
  EFFLLM_TEST_TIER=fast exec python -m pytest -q -m "not model" "$@"
fi
python -m pytest -q "$@"
