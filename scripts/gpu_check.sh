#!/usr/bin/env bash
# GPU check (issue #8): the hf engine on CUDA at bf16, fp16 and int4 with a LoRA adapter, a short streamed
# load, and per precision: tokens/s, J/token (NVML energy counter), GPU memory. Under 8 minutes.
#
# int4 on CUDA is bitsandbytes NF4 (the hf engine's CPU int4 is torchao's). The server's own traces are read
# back with `effllm report`: its energy source must say measured-nvml there.
#
#   bash scripts/gpu_check.sh prepare   # here, once: .gpucheck/ = model config + tokenizer + py3.12 wheels
#   bash scripts/gpu_check.sh           # on the GPU machine, carrying .gpucheck (device run, carry=[".gpucheck"])
#   bash scripts/gpu_check.sh smoke     # here: bf16 on CPU, no NVML figures
#   PRECISIONS=bf16 bash scripts/gpu_check.sh profile   # there: bench/hf_step.py on CUDA first
# The device tool sends the session's own checkout: run `prepare` in that checkout (it writes .gpucheck/ and
# adds it to .git/info/exclude), then: run(command="bash scripts/gpu_check.sh", carry=[".gpucheck"],
# timeout_s=540). Weights: the real 517 MB checkpoint is over the 64 MiB carry limit, so unless the
# default model resolves there, random bf16 weights of the same architecture are used (speed, memory and
# energy per token do not depend on the weight values; the text does).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mode="${1:-run}"

if [ "$mode" = prepare ]; then
  grep -qx '/.gpucheck/' .git/info/exclude 2>/dev/null || echo '/.gpucheck/' >> "$(git rev-parse --git-path info/exclude)"
  exec python scripts/gpu_check.py prepare --out .gpucheck
fi

PY=python3
if [ "$mode" = smoke ]; then
  PY=python
else
  # The image has torch, transformers, peft, grpcio, nvidia-ml-py; the rest travels as wheels.
  if ls .gpucheck/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpucheck/wheels/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # bitsandbytes, unpacked by `prepare` with only the CUDA 13 kernels (the whole wheel is 41 MiB)
  [ -d .gpucheck/site ] && export PYTHONPATH="$PWD/.gpucheck/site${PYTHONPATH:+:$PYTHONPATH}"
  # effllm without installing it: a namespace folder whose packages are this checkout's top-level folders.
  shim=/tmp/effllm-shim/effllm
  mkdir -p "$shim"
  for pkg in api server client tuner loadtest telemetry cli common; do
    [ -d "$pkg" ] && ln -sfn "$PWD/$pkg" "$shim/$pkg"
  done
  export PYTHONPATH="/tmp/effllm-shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    "transformers", transformers.__version__, "peft", peft.__version__)' || true
  $PY -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' || true
fi

if [ "$mode" = smoke ]; then
  exec timeout 480 $PY scripts/gpu_check.py run --device cpu --precisions bf16 --out runs/gpu_check_smoke
fi
if [ "$mode" = profile ]; then  # where an hf-engine step goes on this GPU (bench/hf_step.py), then the check
  timeout 120 $PY bench/hf_step.py --device cuda --model .gpucheck/model --steps 20 || true
  timeout 60 $PY bench/hf_step.py --device cuda --tiny --model .gpucheck/model --steps 20 || true
fi
exec timeout 470 $PY scripts/gpu_check.py run --device cuda --precisions "${PRECISIONS:-bf16,fp16,int4}"
