"""The `effllm` dispatcher: every subcommand the brief names is there, `bench` reaches the scripts, and
`effllm chat` holds a conversation in a real terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from effllm.cli.main import build_parser


def test_all_subcommands_are_registered() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "generate", "chat", "adapters", "tune", "load", "report", "bench"} <= set(sub.choices)


def test_bench_runs_a_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "bench", "serving", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--concurrency" in out.stdout


def test_chat_answers_two_turns_and_ctrl_c_cancels_only_the_reply(vllm_server) -> None:  # type: ignore[no-untyped-def]
    """`effllm chat` in a pseudo-terminal: two turns answered (the second sees the first), a Ctrl-C
    mid-reply cancels that reply on the server and the session goes on, Ctrl-D ends it with 0."""
    pexpect = pytest.importorskip("pexpect")
    with vllm_server.client() as client:
        cancelled_before = client.stats().requests_cancelled
    child = pexpect.spawn(
        sys.executable,
        ["-m", "effllm.cli.main", "chat", "--target", vllm_server.target, "--temperature", "0"],
        encoding="utf-8",
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        child.expect_exact("you> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("you> ")
        assert "Paris" in child.before
        story = "Tell me a very long story about a dragon, with many details."
        child.sendline(story)
        child.expect_exact(story)
        child.expect(r"[A-Za-z]{2,}")  # the reply has started streaming
        child.sendintr()
        child.expect_exact("[cancelled]")
        child.expect_exact("you> ")
        child.sendline("And what is the capital of Germany?")
        child.expect_exact("you> ")
        assert "Berlin" in child.before
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    with vllm_server.client() as client:
        deadline = time.monotonic() + 10
        while client.stats().requests_cancelled == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.stats().requests_cancelled > cancelled_before
