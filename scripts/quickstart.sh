#!/usr/bin/env bash
# Install, serve the embedded default model over gRPC, ask it one question, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
port=${EFFLLM_PORT:-50051}
effllm serve --port "$port" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
effllm generate --target "127.0.0.1:$port" --wait 600 --temperature 0 --max-new-tokens 64 \
  --chat "In one sentence: what is a large language model?"
