"""Run one headless campaign: (optionally) start a server, run Locust in subprocesses, collect, report.

Locust never runs in this process (it would monkey-patch the stdlib): it runs as `python -m locust -f
loadtest/user.py` — one local process, or a master plus N workers on loopback (distributed mode, the same
locustfile) — configured through a LoadConfig JSON file. Around it this process takes GetStats/GetModelInfo
before and after, watches the server's process tree when it knows its pid, and then joins everything into
one report (JSON, Markdown, HTML) in the run directory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..client import EffllmClient
from ..client.launch import ServerProcess, free_port, start_server
from ..telemetry.sampler import read_samples, summarize
from ..telemetry.tracing import SAMPLES_FILE, TRACES_FILE
from . import render
from .config import ENV, LoadConfig
from .report import Slo, build, read_locust_stats, read_rows
from .resources import ResourceWatch
from .traces import ServerSpan, join, load_spans


def locustfile() -> str:
    spec = find_spec("effllm.loadtest.user")  # located, not imported: importing it would load locust
    assert spec is not None and spec.origin
    return spec.origin


@dataclass
class ServerHandle:
    """An `effllm serve` subprocess started for the campaign (`--serve "ARGS"`), through the launcher the
    tests and benchmarks use; its traces and resource samples land beside the campaign's results."""

    server: ServerProcess
    run_dir: Path | None = None  # the server's telemetry run dir (traces.jsonl, resource-samples.jsonl)

    @property
    def target(self) -> str:
        return self.server.target

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.server.proc

    @classmethod
    def start(
        cls, args: str, log_dir: Path, ready_timeout: float = 900.0, env: dict[str, str] | None = None
    ) -> ServerHandle:
        log_dir.mkdir(parents=True, exist_ok=True)
        argv = shlex.split(args)
        run_dir = None
        if "--run-dir" not in argv and "--no-telemetry" not in argv:
            run_dir = log_dir / "server"
            argv += ["--run-dir", str(run_dir)]
        server = start_server(*argv, log_dir=log_dir, ready_timeout=ready_timeout, env=env)
        return cls(server, run_dir)

    def stop(self, timeout: float = 60.0) -> int:
        return self.server.stop(timeout=timeout)


@dataclass(frozen=True)
class Campaign:
    config: LoadConfig
    slo: Slo = field(default_factory=Slo)
    workers: int = 0  # 0: one local Locust process; N: a master and N workers on loopback
    traces: tuple[Path, ...] = ()  # server trace files/dirs (OTLP/JSON lines)
    server_pid: int | None = None  # watch this process tree (set automatically with --serve)
    server_run_dir: Path | None = None  # the server's telemetry run dir: its traces and resource samples
    label: str = "campaign"

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError("workers must be >= 0")


def _server_snapshot(target: str) -> dict[str, Any]:
    with EffllmClient(target, timeout=10.0) as c:
        s, info = c.stats(), c.model_info()
    return {
        "requests_total": s.requests_total,
        "output_tokens_total": s.output_tokens_total,
        "model_info": {
            "model": info.model,
            "engine": info.engine,
            "precision": info.precision,
            "weight_bytes": info.weight_bytes,
            "device": info.device,
            "parameters": info.parameters,
        },
    }


def _locust_cmds(c: Campaign, run_dir: Path) -> list[list[str]]:
    cfg, w = c.config, c.config.workload
    n_proc = max(1, c.workers)
    user_class = "OpenLoopUser" if w.mode == "open" else "ClosedLoopUser"
    users = n_proc if w.mode == "open" else w.users
    # Past the campaign's own end: requests in flight at duration_s may take up to timeout_s to finish.
    run_time = int(cfg.duration_s + cfg.timeout_s + 10)
    base = [sys.executable, "-m", "locust", "-f", locustfile(), "--loglevel", "WARNING", "--skip-log-setup"]
    head = [
        "--headless",
        "--run-time",
        f"{run_time}s",
        "--stop-timeout",
        str(int(cfg.timeout_s)),
        "--csv",
        str(run_dir / "locust"),
        "--csv-full-history",
        "--json-file",
        str(run_dir / "locust_stats"),  # Locust adds .json
        "--only-summary",
    ]
    if w.shape is None or w.mode == "open":
        head += ["-u", str(users), "-r", str(max(users, 1))]
    if c.workers == 0:
        return [base + head + [user_class]]
    port = free_port()
    master = (
        base
        + head
        + [
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            str(c.workers),
            "--expect-workers-max-wait",
            "60",
            user_class,
        ]
    )
    worker = [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port), user_class]
    return [master] + [worker] * c.workers


def run(c: Campaign) -> dict[str, Any]:
    """Run the campaign, write report.json/.md/.html into its run dir, return the report."""
    run_dir = Path(c.config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("requests-*.jsonl"):
        old.unlink()  # rows from an earlier run in the same directory would join this report
    cfg = replace(c.config, processes=max(1, c.workers))
    cfg_path = cfg.write(run_dir / "load_config.json")
    before = {t: _server_snapshot(t) for t in cfg.targets}
    watch = ResourceWatch(c.server_pid).start() if c.server_pid else None
    env = {**os.environ, ENV: str(cfg_path)}
    procs: list[subprocess.Popen[bytes]] = []
    # Locust's own --run-time ends it; the margin covers start-up and waiting for workers (60 s).
    deadline = time.monotonic() + cfg.duration_s + cfg.timeout_s + 10 + 90
    try:
        with (run_dir / "locust.log").open("wb") as log:
            for cmd in _locust_cmds(c, run_dir):
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
                time.sleep(0.3 if c.workers else 0)  # the master binds before workers connect
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:  # whatever raised (a timeout, Ctrl-C, a failed step), nothing of ours outlives the campaign
        _stop_processes(procs)
        if watch:
            watch.stop()
    after = {t: _server_snapshot(t) for t in cfg.targets}
    rows = read_rows(run_dir)
    if not rows:
        raise RuntimeError(f"Locust recorded no request (exit codes {codes}); see {run_dir / 'locust.log'}")
    server = {
        "requests_total_delta": sum(
            after[t]["requests_total"] - before[t]["requests_total"] for t in cfg.targets
        ),
        "output_tokens_total_delta": sum(
            after[t]["output_tokens_total"] - before[t]["output_tokens_total"] for t in cfg.targets
        ),
        "model_info": before[cfg.targets[0]]["model_info"],
        "targets": {t: before[t]["model_info"] for t in cfg.targets},
    }
    t0 = min(r["t_start"] for r in rows)
    t1 = max(r.get("t_end", r["t_start"]) for r in rows)
    trace_paths = list(c.traces)
    if c.server_run_dir is not None:
        trace_paths.append(c.server_run_dir / TRACES_FILE)
    spans = _wait_for_spans(trace_paths, rows)
    resources = _server_samples(c.server_run_dir, t0, t1)
    if resources is None or not spans:  # a remote server: its figures over the wire (GetTelemetry)
        remote_resources, remote_spans = _remote_telemetry(cfg.targets, t0, t1)
        resources = resources or remote_resources
        spans = spans or remote_spans
    resources = resources or (watch.summary(t0, t1) if watch else None)
    report = build(
        rows,
        locust=read_locust_stats(run_dir / "locust"),
        spans=spans,
        server=server,
        resources=resources,
        slo=c.slo,
        meta={
            "label": c.label,
            "locust_exit_codes": codes,
            "workers": c.workers,
            "config": json.loads(cfg.to_json()),
        },
    )
    write(run_dir, {c.label: report})
    return report


def _stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """SIGTERM to those still running (Locust writes its stats on it), SIGKILL after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_for_spans(
    paths: list[Path], rows: list[dict[str, Any]], timeout_s: float = 20.0
) -> list[ServerSpan]:
    """The server exports spans in batches (every few seconds): wait until every request's span is in
    (a shared trace file also holds earlier runs' spans, so count joins, not spans)."""
    deadline = time.monotonic() + timeout_s
    spans = load_spans(paths)
    while paths and len(join(rows, spans)) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        spans = load_spans(paths)
    return spans


def _server_samples(run_dir: Path | None, t0: float, t1: float) -> dict[str, Any] | None:
    """AMU, PCU, AEC and energy over [t0, t1] from the server's own resource sampler (its energy source)."""
    if run_dir is None or not (run_dir / SAMPLES_FILE).exists():
        return None
    try:
        w = summarize(read_samples(run_dir / SAMPLES_FILE), t0, t1)
    except ValueError:  # no samples in the window
        return None
    return {
        "source": "server resource sampler",
        "samples": w.samples,
        "window_s": w.duration_s,
        "amu": w.amu,
        "amu_gb": w.amu_bytes / 1e9,
        "peak_rss_gb": w.peak_memory_bytes / 1e9,
        "pcu": w.pcu,
        "energy_j": w.energy_j,
        "aec_w": w.aec_w,
        "energy_source": w.energy_source,
    }


def _remote_telemetry(
    targets: tuple[str, ...], t0: float, t1: float
) -> tuple[dict[str, Any] | None, list[ServerSpan]]:
    """AMU, PCU, AEC and energy over [t0, t1] and per-request figures from each server's GetTelemetry
    (several targets: energy and power add up, utilisations average). (None, []) when no server answers
    (an older server, telemetry off)."""
    import grpc

    windows, spans = [], []
    for target in targets:
        try:
            with EffllmClient(target, timeout=30.0) as client:
                tel = client.telemetry(t0 - 0.5, t1 + 0.5)
        except grpc.RpcError:
            continue
        if tel.HasField("resources") and tel.resources.samples >= 2:
            windows.append(tel.resources)
        for r in tel.requests:
            attrs: dict[str, Any] = {
                "gen_ai.response.id": r.request_id,
                "effllm.adapter.name": r.adapter.partition("@")[0],
                "effllm.time_to_first_token_s": r.time_to_first_token_s,
                "effllm.decode_s": r.decode_s,
                "gen_ai.usage.output_tokens": r.output_tokens,
                "gen_ai.usage.input_tokens": r.input_tokens,
            }
            if r.HasField("energy_j"):
                attrs["effllm.energy_j"] = r.energy_j
                attrs["effllm.energy.source"] = r.energy_source
            spans.append(ServerSpan("", "", f"generate {tel.model}", r.start_unix_s, r.end_unix_s, attrs))
    if not windows:
        return None, spans
    n = len(windows)
    return {
        "source": "server GetTelemetry" + (f" ({n} servers)" if n > 1 else ""),
        "samples": sum(w.samples for w in windows),
        "window_s": max(w.window_s for w in windows),
        "amu": sum(w.amu for w in windows) / n,
        "amu_gb": sum(w.amu_bytes for w in windows) / 1e9,
        "peak_rss_gb": sum(w.peak_memory_bytes for w in windows) / 1e9,
        "pcu": sum(w.pcu for w in windows) / n,
        "energy_j": sum(w.energy_j for w in windows),
        "aec_w": sum(w.aec_w for w in windows),
        "energy_source": "+".join(sorted({w.energy_source for w in windows})),
    }, spans


def write(run_dir: Path, reports: dict[str, dict[str, Any]], precision: dict[str, Any] | None = None) -> Path:
    """report.json, report.md and report.html in run_dir; returns the HTML path."""
    doc: dict[str, Any] = {"reports": reports, "precision": precision}
    (run_dir / "report.json").write_text(json.dumps(doc, indent=1, default=str))
    (run_dir / "report.md").write_text(render.markdown(reports, precision))
    page = run_dir / "report.html"
    page.write_text(render.html_page(reports, precision))
    return page
