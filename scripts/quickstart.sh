#!/usr/bin/env bash
# Install, serve the embedded default model over gRPC, ask it one question, stop the server.
# The server's console lines and its full log (vLLM's records included) stay in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
port=${EFFLLM_PORT:-50051}
run_dir=runs/quickstart
mkdir -p "$run_dir"
question="In one sentence: what is a large language model?"
echo "starting effllm serve on 127.0.0.1:$port (loading the model takes a few minutes)..."
effllm serve --port "$port" --run-dir "$run_dir" >"$run_dir/console.txt" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
# --wait: until the model is loaded. A chat turn (the model has a chat template), greedy for a stable answer.
answer=$(effllm generate --target "127.0.0.1:$port" --wait 600 --temperature 0 --max-new-tokens 64 \
  "$question" 2>"$run_dir/generate-stats.txt") || { cat "$run_dir/generate-stats.txt" "$run_dir/console.txt" >&2; exit 1; }
sed 's/^/  server: /' "$run_dir/console.txt"
echo
echo "Q: $question"
echo "A: $answer"
echo
echo "  $(cat "$run_dir/generate-stats.txt")"
echo "  full server log: $run_dir/server.log"
