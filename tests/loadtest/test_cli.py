"""`effllm load` end to end: it starts its own server (--serve), runs a precision sweep of one precision,
scores perplexity in a separate process, writes JSON/Markdown/HTML, and the HTML renders in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"


def _screenshot(html: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--screenshot={png}",
            "--window-size=1280,2000",
            f"file://{html}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_effllm_load_precision_sweep_writes_a_report_that_renders(tmp_path: Path) -> None:
    run_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "effllm.cli.main",
        "load",
        "--serve",
        "--kv-cache-gib 0.25 --max-concurrency 4 --max-context 512",
        "--precisions",
        "fp32",
        "--users",
        "2",
        "--duration",
        "3",
        "--output-len",
        "6",
        "--prompt-len",
        "12",
        "--timeout",
        "150",
        "--slo",
        "ttft=600,tpot=60",
        "--run-dir",
        str(run_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads((run_dir / "report.json").read_text())
    rep = doc["reports"]["fp32"]
    assert rep["requests"]["ok"] == rep["requests"]["total"] == rep["requests"]["server_requests_delta"] > 0
    rec = doc["precision"]["records"][0]
    assert rec["precision"] == "fp32" and rec["weight_mb"] > 100  # 135M params at 4 bytes
    assert rec["mcr"] == pytest.approx(1.0)  # the reference against itself
    assert 1.0 < rec["perplexity"] < 200.0, rec  # a real language model on plain English
    assert rec["amu_gb"] > 0.1 and rec["j_per_token"] > 0 and "estimated" in rec["energy_source"]
    md = (run_dir / "report.md").read_text()
    assert "Precision table" in md and "fp32" in md
    html = run_dir / "report.html"
    assert html.read_text().count("data:image/png;base64,") >= 3

    png = tmp_path / "report.png"
    _screenshot(html, png)
    import matplotlib.image as mpimg

    img = mpimg.imread(png)  # (H, W, C) floats in [0, 1]
    assert img.shape[0] == 2000 and img.shape[1] == 1280
    assert img[..., :3].std() > 0.05  # not a blank page: tables and plots drew
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, ARTIFACTS / "report-screenshot.png")
    shutil.copy(html, ARTIFACTS / "report.html")
