"""One variant's engine dies under mixed traffic and the other serves on (issue 27 item 5): the server of
test_variants_vllm.py (`--variant fp32:vllm --variant int4:hf`), whose vLLM engine core is SIGKILLed while
streams and unary requests run on both variants. The dead variant's requests end UNAVAILABLE naming it
(retryable, never INTERNAL), no request fails on int4:hf, every request after the death is served there,
health stays SERVING, GetModelInfo shows fp32:vllm DEAD and the log says so; SIGTERM still drains to exit 0.
Its own server (the kill would spoil test_variants_vllm's), one for the module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from effllm.api.v1 import generation_pb2 as pb

from ..serverproc import ServerProcess, start_server
from .conftest import variants_by_name, wait_idle

PROMPT = "Once upon a time, in a small village by the sea,"
VLLM, INT4 = "fp32:vllm", "int4:hf"
SLOTS = 2
NEW_TOKENS = 32
# QUALITY goes to fp32:vllm (the better variant, whatever its load); LATENCY spreads over both as one
# variant's slots fill; streams and unary calls both.
TRAFFIC = (("quality", True), ("quality", False), ("latency", True), ("latency", False), ("energy", True))


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    variant: str  # the variant that served it ("" when it failed)
    code: str  # "OK" or the gRPC status name
    details: str


@pytest.fixture(scope="module")
def server(logs_dir: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        "--variant",
        VLLM,
        "--variant",
        INT4,
        "--max-concurrency",
        str(SLOTS),
        "--queue-size",
        "16",
        "--max-context",
        "512",
        "--kv-cache-gib",
        "0.25",
        log_dir=logs_dir,
        ready_timeout=900,  # vLLM's start-up plus its logprobs compile, on a shared 2-core box
    )
    yield proc
    assert proc.stop() == 0  # the survivor drains as ever


def _one(server: ServerProcess, objective: str, streamed: bool) -> Outcome:
    started = time.monotonic()
    try:
        with server.client(timeout=300) as c:
            if streamed:
                final = None
                for chunk in c.stream(
                    PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True, objective=objective
                ):
                    if chunk.HasField("final"):
                        final = chunk.final
                assert final is not None and final.usage.output_tokens == NEW_TOKENS
                return Outcome(started, final.variant, "OK", "")
            reply = c.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True, objective=objective)
            assert reply.usage.output_tokens == NEW_TOKENS
            return Outcome(started, reply.variant, "OK", "")
    except grpc.RpcError as err:
        return Outcome(started, "", err.code().name, err.details() or "")


def test_sigkill_of_the_vllm_engine_core_leaves_int4_serving(server: ServerProcess) -> None:
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def traffic(objective: str, streamed: bool) -> None:
        while not stop.is_set():
            outcomes.append(_one(server, objective, streamed))

    with server.client(timeout=30) as c:
        wait_idle(c, 300)
        threads = [threading.Thread(target=traffic, args=t, daemon=True) for t in TRAFFIC]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while True:  # kill while both variants hold requests
            v = variants_by_name(c)
            if v[VLLM].live.running >= 1 and v[INT4].live.running >= 1:
                break
            assert time.monotonic() < deadline, "the traffic never ran on both variants at once"
            time.sleep(0.1)
        cores = [
            p
            for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline())
        ]
        assert len(cores) == 1, "expected one vLLM engine core (the fp32:vllm variant's)"
        killed = time.monotonic()
        cores[0].kill()
        health = []
        deadline = time.monotonic() + 300
        # traffic on until the survivor has answered two requests per thread begun after the kill
        while len([o for o in outcomes if o.started > killed + 1.0]) < len(TRAFFIC) * 2:
            assert time.monotonic() < deadline, "the survivor stopped serving"
            health.append(c.health())
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(300)
        assert server.proc.poll() is None and set(health) == {"SERVING"}, health
        info = {v.name: v for v in c.model_info().variants}
        assert info[VLLM].state == pb.VARIANT_STATE_DEAD and info[INT4].state == pb.VARIANT_STATE_SERVING
        assert c.health() == "SERVING"

    failed = [o for o in outcomes if o.code != "OK"]
    after = [o for o in outcomes if o.started > killed]
    served = {name: sum(o.variant == name for o in outcomes) for name in (VLLM, INT4)}
    codes = sorted({o.code for o in failed})
    print(f"served {served}, failed {len(failed)} {codes}, begun after the kill {len(after)}")
    assert failed, "no request was on fp32:vllm when its engine died"
    # The dead variant's requests only, each retryable and naming it: those it held, and those routed to it
    # before vLLM itself noticed the death (its monitor thread; routing asks it at every choice).
    for o in failed:
        assert o.code == "UNAVAILABLE" and VLLM in o.details and o.started < killed + 30.0, o
    assert not [o for o in after if o.code == "OK" and o.variant != INT4], after
    assert [o for o in outcomes if o.variant == INT4], "nothing served on int4:hf"
    log = server.log()
    assert f"variant {VLLM} died" in log and f"{INT4} keeps serving" in log
    assert "engine died: health NOT_SERVING" not in log
