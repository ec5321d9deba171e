#!/usr/bin/env bash
# Install, then run the whole test suite against the real server, engine and model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
