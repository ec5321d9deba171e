"""The locustfile as any Locust user runs it, against the real vLLM server: `locust -f loadtest/user.py
--host HOST:PORT` headless (CSV rows ttft/tpot/itl/e2e, no failures) and with its web UI (the effllm
options in the start form, in the page's data and — where Chromium is installed — on screen)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from effllm.loadtest.campaign import locustfile

from ..serverproc import ServerProcess, free_port

OPTIONS = ("effllm_rate", "effllm_adapters", "effllm_output_len", "effllm_temperature")


def _locust(*args: str, cwd: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "locust", "-f", locustfile(), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_headless_run_writes_ttft_tpot_itl_e2e_rows(vllm_server: ServerProcess, tmp_path: Path) -> None:
    proc = _locust(
        "--host", vllm_server.target, "--headless", "-u", "2", "-r", "2", "-t", "15s",
        "--csv", str(tmp_path / "run"), "--only-summary",
        "--effllm-output-len", "8", "--effllm-prompt-len", "16", "--effllm-ignore-eos",
        cwd=tmp_path,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    with (tmp_path / "run_stats.csv").open() as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert int(stats[name]["Request Count"]) > 0, (name, stats)
        assert int(stats[name]["Failure Count"]) == 0, (name, stats)
    e2e, itl = int(stats["e2e"]["Request Count"]), int(stats["itl"]["Request Count"])
    assert itl == 7 * e2e  # 8 tokens a request: 7 inter-token gaps each
    assert int(stats["Aggregated"]["Failure Count"]) == 0


def _get(url: str, data: dict[str, str] | None = None) -> str:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    with urllib.request.urlopen(url, data=body, timeout=10) as reply:
        return reply.read().decode()


def test_web_ui_lists_the_effllm_options_and_runs_with_them(
    vllm_server: ServerProcess, tmp_path: Path
) -> None:
    port = free_port()
    proc = _locust(
        "--host", vllm_server.target, "--web-host", "127.0.0.1", "--web-port", str(port),
        "--effllm-adapters", "", "--effllm-output-len", "4",
        cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        page = ""
        while time.monotonic() < deadline and not page:
            try:
                page = _get(url + "/")
            except OSError:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                time.sleep(0.5)
        for option in OPTIONS:  # the start form's custom parameters (Locust's extraOptions)
            assert option in page, option
        # start from the form's fields, as the UI does, with an effllm option changed there
        started = json.loads(
            _get(
                url + "/swarm",
                {"user_count": "1", "spawn_rate": "1", "host": vllm_server.target, "effllm_output_len": "3"},
            )
        )
        assert started.get("success"), started
        deadline = time.monotonic() + 90
        names: dict[str, dict] = {}
        while time.monotonic() < deadline and not names.get("e2e", {}).get("num_requests"):
            time.sleep(1)
            stats = json.loads(_get(url + "/stats/requests"))
            names = {s["name"]: s for s in stats["stats"]}
        assert names["e2e"]["num_requests"] > 0 and names["e2e"]["num_failures"] == 0, names
        assert names["itl"]["num_requests"] <= 2 * names["e2e"]["num_requests"] + 2  # 3 tokens: 2 gaps each
        _get(url + "/stop", {})  # POST
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("chromium is not installed: the options were checked in the page's data only")
        shot = tmp_path / "ui.png"
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=8000",
                "--dump-dom",
                url + "/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=8000",
                "--window-size=1280,2400",
                f"--screenshot={shot}",
                url + "/",
            ],
            capture_output=True,
            timeout=120,
        )
        assert "effllm" in dom.lower(), dom[-2000:]  # rendered by the UI's scripts, not just in its data
        from PIL import Image

        with Image.open(shot) as image:
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # a rendered page, not a blank one
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
