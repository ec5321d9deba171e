"""What a newcomer meets first, on real servers: `effllm generate` answers a plain question, the model's
own sampling defaults apply to unset fields (and show in GetModelInfo), the console stays quiet while the
libraries' records land in the run dir's log, and GetTelemetry returns the server's figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ..serverproc import ServerProcess, start_server

QUESTION = "What is the capital of France?"


def _run_dir(server: ServerProcess) -> Path:
    m = re.search(r"run dir (\S+) \(log: (\S+)\)", server.log())
    assert m, server.log()[-2000:]
    return Path(m.group(1))


def test_generate_answers_a_plain_question(vllm_server: ServerProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "generate", QUESTION, "--target", vllm_server.target],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), f"no answer; stderr: {out.stderr}"
    # a chat turn (the model has a template): the prompt is the rendered turn, longer than the raw question
    m = re.search(r"\[(\d+) prompt \+ (\d+) new tokens", out.stderr)
    assert m and int(m.group(1)) > 10 and int(m.group(2)) > 1, out.stderr
    cmd = [sys.executable, "-m", "effllm.cli.main", "generate", "--raw", "The capital of France is"]
    raw = subprocess.run(
        [*cmd, "--max-new-tokens", "4", "--target", vllm_server.target],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert raw.returncode == 0 and re.search(r"\[[1-9] prompt \+", raw.stderr), raw.stderr


def test_model_info_shows_the_real_models_defaults(vllm_server: ServerProcess) -> None:
    from effllm.common.model import resolve_model

    config = json.loads((resolve_model(None).path / "generation_config.json").read_text())
    with vllm_server.client() as client:
        info = client.model_info()
    d = info.sampling_defaults
    assert info.chat_template
    # SmolLM2's generation_config sets no sampling key: the built-in defaults, and it says so
    assert not {"temperature", "top_p", "top_k", "repetition_penalty", "do_sample"} & set(config)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    assert list(d.from_model) == [] and d.max_new_tokens == 128


def test_console_is_quiet_and_the_log_file_has_the_rest(vllm_server: ServerProcess) -> None:
    console = vllm_server.log()
    assert "ready:" in console and "listening on" in console and "run dir" in console
    assert "EngineCore" not in console and "vllm" not in console.replace("vllm engine", "").replace(
        "(vllm,", ""
    ), console[-3000:]
    assert len(console.splitlines()) <= 10, console
    log = (_run_dir(vllm_server) / "server.log").read_text(errors="replace")
    # vLLM's records, those of the engine core (a child process, so another pid) included
    pids = {int(p) for p in re.findall(r"vllm\.v1\.engine\.core \[pid (\d+)\]", log)}
    assert pids and vllm_server.proc.pid not in pids, log[-3000:]


def test_get_telemetry_returns_samples_requests_and_summary(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as client:
        t0 = time.time()
        reply = client.generate(
            messages=[("user", QUESTION)], max_new_tokens=6, ignore_eos=True, request_id="tele-1"
        )
        tel = client.telemetry(t0 - 1.0, include_samples=True)
        with pytest.raises(grpc.RpcError) as err:
            client.telemetry(10.0, 5.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start_unix_s" in err.value.details()
    assert tel.enabled and tel.model == "SmolLM2-135M-Instruct" and tel.precision == "fp32"
    mine = [r for r in tel.requests if r.request_id == "tele-1"]
    assert len(mine) == 1 and mine[0].output_tokens == reply.usage.output_tokens == 6
    assert mine[0].HasField("energy_j") and mine[0].energy_j > 0 and mine[0].energy_source
    r = tel.resources
    assert r.samples >= 2 and 0 < r.amu <= 1 and 0 < r.pcu <= 1 and r.aec_w > 0 and r.energy_source
    assert len(tel.samples) == r.samples
    total = next(g for g in tel.groups if g.adapter == "ALL")
    assert total.HasField("j_per_token") and total.j_per_token > 0 and total.energy_source


@pytest.fixture(scope="module")
def greedy_model_server(logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The embedded model with a generation_config that asks for greedy decoding and 6 new tokens, on the
    (cheaper to start) hf engine."""
    from effllm.common.model import resolve_model

    src = resolve_model(None).path
    model = tmp_path_factory.mktemp("greedy-model") / "SmolLM2-greedy"
    model.mkdir()
    for f in src.iterdir():
        if f.name != "generation_config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((src / "generation_config.json").read_text())
    config.update(do_sample=False, top_k=5, max_new_tokens=6)
    (model / "generation_config.json").write_text(json.dumps(config))
    server = start_server(
        "--engine", "hf", "--model", str(model), "--max-context", "256", "--max-concurrency", "2",
        "--no-telemetry", log_dir=logs_dir, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    yield server
    server.stop()


def test_unset_sampling_fields_follow_the_generation_config(greedy_model_server: ServerProcess) -> None:
    with greedy_model_server.client(timeout=300) as client:
        d = client.model_info().sampling_defaults
        assert (d.temperature, d.top_k, d.max_new_tokens) == (0.0, 5, 6)
        assert set(d.from_model) == {"do_sample", "top_k", "max_new_tokens"}
        chat = [("user", "Tell me a story about a cat.")]
        # no sampling field at all: greedy (the seed changes nothing) and the model's 6 new tokens
        a = client.generate(messages=chat, seed=1, ignore_eos=True)
        b = client.generate(messages=chat, seed=2, ignore_eos=True)
        greedy = client.generate(messages=chat, temperature=0.0, top_k=0, ignore_eos=True)
    assert a.usage.output_tokens == b.usage.output_tokens == 6
    assert a.text == b.text == greedy.text and a.text.strip()
    assert list(a.token_ids) == list(greedy.token_ids)


def test_telemetry_off_answers_enabled_false(greedy_model_server: ServerProcess) -> None:
    with greedy_model_server.client() as client:
        tel = client.telemetry()
    assert not tel.enabled and not tel.requests and not tel.HasField("resources")
