"""The issue's load campaign, in three steps, through `effllm load` (prints tables, writes JSON).

1. saturation ramp: open-loop Poisson, rate ramping from --ramp-from to --ramp-to req/s; the saturation
   rate is the highest 5 s window rate whose completions kept up with arrivals (throughput still rising,
   no queue build-up: mean TTFT below --ttft-knee-s).
2. the campaign: --duration s at --fraction × saturation rate, N adapters with Zipf(alpha) popularity.
3. the precision table: the same workload (no adapters), short, per precision (`--precisions`).

    python bench/load_campaign.py --out runs/bench-load [--adapters 8] [--duration 120]
Adapters are made with effllm.tuner.synthetic (random LoRA r=8 on the real base) into OUT/adapters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _harness import header, machine_record, write_report


def make_adapters(out: Path, n: int) -> Path:
    from effllm.loadtest.quality import default_model_path
    from effllm.tuner.synthetic import make_adapter

    root = out / "adapters"
    for i in range(1, n + 1):
        if not (root / f"a{i}" / "1" / "adapter_config.json").exists():
            make_adapter(Path(default_model_path()), root / f"a{i}" / "1", rank=8, seed=100 + i)
    return root


def load(*args: str) -> dict:
    cmd = [sys.executable, "-m", "effllm.cli.main", "load", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    run_dir = Path(args[args.index("--run-dir") + 1])
    return json.loads((run_dir / "report.json").read_text())


def saturation(report: dict, knee_s: float) -> float:
    windows = report["series"]["ttft_vs_load"]
    ok = [w for w in windows if w["ttft_mean_s"] is not None and w["ttft_mean_s"] <= knee_s]
    return max((w["rate_rps"] for w in ok), default=min(w["rate_rps"] for w in windows))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/bench-load"))
    p.add_argument("--serve", default="--kv-cache-gib 0.25 --max-concurrency 16 --max-context 512")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--ramp-from", type=float, default=0.2)
    p.add_argument("--ramp-to", type=float, default=4.0)
    p.add_argument("--ramp-s", type=float, default=60.0)
    p.add_argument("--ttft-knee-s", type=float, default=2.0)
    p.add_argument("--fraction", type=float, default=0.9)
    p.add_argument("--rate", type=float, default=None, help="skip the ramp, use this rate")
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--precisions", default="fp32,bf16,fp16,int4")
    p.add_argument("--precision-duration", type=float, default=20.0)
    p.add_argument("--precision-rate", type=float, default=0.5)
    p.add_argument("--prompt-len", default="uniform:16-64")
    p.add_argument("--output-len", default="uniform:16-32")
    p.add_argument("--skip", default="", help="comma list of steps to skip: ramp,campaign,precision")
    a = p.parse_args()
    record = machine_record()
    a.out.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    names = ",".join(f"a{i}" for i in range(1, a.adapters + 1))
    adapter_serve = a.serve
    if a.adapters:
        root = make_adapters(a.out, a.adapters)
        adapter_serve += f" --adapter-root {root} --max-adapters-per-batch {a.adapters} " + " ".join(
            f"--preload a{i}" for i in range(1, a.adapters + 1)
        )
    common = [
        "--prompt-len",
        a.prompt_len,
        "--output-len",
        a.output_len,
        "--timeout",
        "300",
        "--slo",
        "ttft=2,tpot=0.5",
    ]
    adapter_args = (
        ["--adapters", names, "--popularity", "zipf", "--zipf-alpha", str(a.zipf_alpha)] if a.adapters else []
    )
    summary: dict = {}
    # One adapter server for the ramp and the campaign (a start costs minutes on a loaded machine).
    from effllm.loadtest.campaign import ServerHandle

    server = ServerHandle.start(adapter_serve, a.out / "server")
    assert server.run_dir is not None
    served = [
        "--target",
        server.target,
        "--server-run-dir",
        str(server.run_dir),
        "--server-pid",
        str(server.proc.pid),
    ]
    rate = a.rate
    if rate is None and "ramp" not in skip:
        ramp = load(
            *served,
            "--rate",
            str(a.ramp_to),
            "--shape",
            "ramp",
            "--shape-start",
            str(a.ramp_from),
            "--shape-end",
            str(a.ramp_to),
            "--duration",
            str(a.ramp_s),
            "--run-dir",
            str(a.out / "ramp"),
            "--label",
            "ramp",
            *common,
            *adapter_args,
        )["reports"]["ramp"]
        rate = saturation(ramp, a.ttft_knee_s)
        summary["ramp"] = {"windows": ramp["series"]["ttft_vs_load"], "saturation_rps": rate}
        print(f"saturation ≈ {rate:.2f} req/s")
    if "campaign" not in skip:
        target = (rate or 1.0) * a.fraction
        rep = load(
            *served,
            "--rate",
            f"{target:.3f}",
            "--duration",
            str(a.duration),
            "--run-dir",
            str(a.out / "campaign"),
            "--label",
            "campaign",
            *common,
            *adapter_args,
        )["reports"]["campaign"]
        summary["campaign"] = {
            k: rep[k]
            for k in (
                "requests",
                "wall_s",
                "output_tokens",
                "throughput",
                "latency_s",
                "goodput",
                "per_adapter",
                "efficientllm",
                "server",
            )
        }
        summary["campaign"]["rate_rps"] = target
    server.stop()
    if "precision" not in skip:
        doc = load(
            "--serve",
            a.serve,
            "--precisions",
            a.precisions,
            "--rate",
            str(a.precision_rate),
            "--duration",
            str(a.precision_duration),
            "--run-dir",
            str(a.out / "precision"),
            *common,
        )
        summary["precision"] = doc["precision"]
        print("\n".join(" | ".join(r) for r in [doc["precision"]["columns"], *doc["precision"]["rows"]]))
    write_report(a.out / "summary.json", summary, record)
    print(header(record))
    print(f"wrote {a.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
