"""Short REAL campaigns: real Locust subprocesses against the real vLLM server, loopback only.

Checks self-consistency across three independent views of the same run: Locust's own stats, the per-request
rows and the server's counters (GetStats; server spans when the server writes traces).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from effllm.loadtest.campaign import Campaign, run
from effllm.loadtest.config import LoadConfig
from effllm.loadtest.report import Slo, build, read_rows
from effllm.loadtest.workload import LengthDist, PromptSource, Workload

from ..serverproc import ServerProcess


def _server_run_dir(server: ServerProcess) -> Path:
    """The fixture server's telemetry run dir, from its start-up log line (`traces -> PATH`)."""
    m = re.search(r"traces -> (\S+)", server.log())
    assert m, "the server logged no trace file: is telemetry on?"
    return Path(m.group(1)).parent


def _check_consistent(rep: dict, expect_ok: bool = True) -> None:
    req = rep["requests"]
    assert req["total"] > 0 and req["ok"] > 0
    if expect_ok:
        assert req["errors"] == {}, req["errors"]
    # Locust's own count of finished requests == our rows == what the server says it finished
    assert rep["locust"]["e2e"]["requests"] == req["total"]
    assert req["server_requests_delta"] == req["total"]
    assert req["server_output_tokens_delta"] == rep["output_tokens"] > 0
    assert rep["locust"]["ttft"]["requests"] == req["ok"]
    # tokens/s is tokens over wall time (the paper's IT = Σ tokens / Σ latency is reported beside it)
    thr = rep["throughput"]
    assert thr["tokens_per_s_wall"] == pytest.approx(rep["output_tokens"] / rep["wall_s"])
    assert thr["it_tokens_per_s"] > 0
    # every request's server span was found by its trace id (W3C context from the Locust user)
    srv = rep["server"]
    assert srv["joined"] == req["total"] and srv["ttft_source"] == "server spans"
    # the client sees the first token no earlier than the server produced it
    assert srv["ttft_pairs"] == req["ok"] and srv["client_ttft_ge_server"] == srv["ttft_pairs"]
    lat = rep["latency_s"]
    assert 0 < lat["ttft"]["p50"] <= lat["e2e"]["p50"]
    assert lat["tpot"]["n"] > 0 and lat["itl"]["n"] > 0


def test_open_loop_campaign_is_self_consistent(vllm_server: ServerProcess, tmp_path: Path) -> None:
    wl = Workload(
        seed=4,  # 4 arrivals in the 3 s window with this seed
        mode="open",
        rate=2.0,
        prompts=PromptSource("synthetic", LengthDist.parse("uniform:8-24")),
        output=LengthDist.parse("8"),
    )
    cfg = LoadConfig(
        targets=(vllm_server.target,),
        workload=wl,
        duration_s=3.0,
        timeout_s=150.0,
        run_dir=str(tmp_path / "open"),
    )
    run_dir = _server_run_dir(vllm_server)
    rep = run(Campaign(cfg, slo=Slo(ttft_s=5.0, tpot_s=1.0), server_run_dir=run_dir, label="open"))
    _check_consistent(rep)
    assert 1 <= rep["requests"]["total"] <= 20  # ~6 expected at 2 req/s for 3 s
    eff = rep["efficientllm"]
    # resources from the server's own sampler over the campaign window; energy labelled with its source
    assert eff["resources_from"] == "server resource sampler"
    assert eff["amu_gb"] > 0.1 and 0 < eff["amu_ratio"] < 1 and 0 < eff["pcu"] <= 1
    assert eff["energy_j"] > 0 and eff["energy_source"] in ("estimated", "measured")
    assert eff["j_per_token"] == pytest.approx(eff["energy_j"] / rep["output_tokens"])
    assert eff["attributed_energy_j"] > 0  # the server's per-request energy, from its spans
    base = rep["per_adapter"]["(base)"]
    assert base["j_per_token"] == pytest.approx(base["energy_j"] / base["output_tokens"])
    # goodput counts exactly the requests within the SLOs (same rows, three bounds)
    rows = read_rows(tmp_path / "open")
    ttfts = sorted(r["ttft_s"] for r in rows)
    assert build(rows, slo=Slo(ttft_s=1e-6))["goodput"]["requests"] == 0
    assert build(rows, slo=Slo(ttft_s=ttfts[-1]))["goodput"]["requests"] == len(rows)
    mid = build(rows, slo=Slo(ttft_s=ttfts[1]))["goodput"]
    assert mid["requests"] == sum(t <= ttfts[1] for t in ttfts)
    assert mid["share"] == mid["requests"] / len(rows)
    html = (tmp_path / "open" / "report.html").read_text()
    assert "data:image/png;base64," in html and "EfficientLLM" in html


def test_distributed_master_and_workers(vllm_server: ServerProcess, tmp_path: Path) -> None:
    """The same locustfile as master + 2 workers on loopback, closed loop, 2 users; ignore_eos makes every
    request decode exactly its drawn output length."""
    wl = Workload(seed=2, mode="closed", users=2, output=LengthDist.parse("uniform:6-12"), ignore_eos=True)
    cfg = LoadConfig(
        targets=(vllm_server.target,),
        workload=wl,
        duration_s=3.0,
        timeout_s=150.0,
        run_dir=str(tmp_path / "dist"),
    )
    rep = run(Campaign(cfg, workers=2, server_run_dir=_server_run_dir(vllm_server), label="dist"))
    _check_consistent(rep)
    assert rep["meta"]["locust_exit_codes"] == [0, 0, 0]
    assert len(list((tmp_path / "dist").glob("requests-*.jsonl"))) == 2  # one rows file per worker
    rows = [r for r in read_rows(tmp_path / "dist") if r["status"] == "OK"]
    assert rows and all(r["output_tokens"] == r["max_new_tokens"] for r in rows)


def test_a_failing_step_leaves_no_locust_process_or_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Locust master is running when the step after it raises: the campaign must still stop it
    and its resource watcher (the server snapshot is faked: no server is needed to reach that point)."""
    import os
    import threading

    import psutil

    from effllm.loadtest import campaign

    snapshot = {"requests_total": 0, "output_tokens_total": 0, "model_info": {}}
    monkeypatch.setattr(campaign, "_server_snapshot", lambda target: snapshot)
    spawned: list[int] = []
    real_popen = campaign.subprocess.Popen

    def popen(*args: object, **kwargs: object) -> object:
        if spawned:  # the master runs; starting its worker fails
            raise RuntimeError("injected: a step failed mid-campaign")
        proc = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        spawned.append(proc.pid)
        return proc

    monkeypatch.setattr(campaign.subprocess, "Popen", popen)
    cfg = LoadConfig(
        targets=("127.0.0.1:1",),
        workload=Workload(seed=1, mode="closed", users=1, output=LengthDist.parse("4")),
        duration_s=60.0,
        timeout_s=10.0,
        run_dir=str(tmp_path / "fail"),
    )
    with pytest.raises(RuntimeError, match="injected"):
        run(Campaign(cfg, workers=1, server_pid=os.getpid()))
    assert spawned, "the Locust master never started: the test did not reach the failing step"
    alive = [pid for pid in spawned if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []
    assert not [t for t in threading.enumerate() if t.name == "effllm-resource-watch" and t.is_alive()]


def test_target_only_campaign_gets_the_servers_figures_over_the_wire(
    vllm_server: ServerProcess, tmp_path: Path
) -> None:
    """A server started separately, its run dir unknown to the campaign: AMU, PCU, AEC and J/token (with
    their source) come from GetTelemetry, per request joined by request id."""
    wl = Workload(seed=4, mode="open", rate=2.0, prompts=PromptSource("synthetic", LengthDist.parse("16")))
    wl = Workload(**{**wl.__dict__, "output": LengthDist.parse("8"), "ignore_eos": True})
    cfg = LoadConfig(
        targets=(vllm_server.target,), workload=wl, duration_s=3.0, timeout_s=60.0, run_dir=str(tmp_path)
    )
    rep = run(Campaign(cfg, label="remote"))
    eff = rep["efficientllm"]
    assert eff["resources_from"] == "server GetTelemetry"
    assert 0 < eff["amu_ratio"] <= 1 and 0 < eff["pcu"] <= 1 and eff["aec_w"] > 0
    assert eff["energy_j"] > 0 and eff["energy_source"] and eff["j_per_token"] > 0
    assert rep["server"]["joined"] == rep["requests"]["total"] > 0
    base = rep["per_adapter"]["(base)"]
    assert base["j_per_token"] > 0 and base["energy_source"]
    assert "AMU" in (tmp_path / "report.md").read_text()
