"""A server's life: NOT_SERVING while the model loads, SERVING after, drains on SIGTERM and exits 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc

from effllm.api.v1 import generation_pb2 as pb

from ..serverproc import start_server, wait_serving


def test_health_goes_not_serving_to_serving_then_drains(logs_dir: Path) -> None:
    # slow-* requests stall 3 s inside the engine (holding their slot): a request surely in flight at SIGTERM.
    server = start_server(
        "--kv-cache-gib",
        "0.25",
        "--max-context",
        "512",
        "--grace",
        "20",
        log_dir=logs_dir,
        wait=False,
        env={"EFFLLM_FAILPOINTS": "engine_delay_prefix=slow-,engine_delay_s=3"},
    )
    try:
        seen: list[str] = []
        with server.client(timeout=2.0) as c:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and "SERVING" not in seen:
                try:
                    status = c.health()
                    if not seen or seen[-1] != status:
                        seen.append(status)
                    if status == "NOT_SERVING":
                        # Generation is refused while the model loads, not queued.
                        try:
                            c.generate("hi", max_new_tokens=1)
                        except grpc.RpcError as err:
                            assert err.code() == grpc.StatusCode.UNAVAILABLE
                except grpc.RpcError:
                    pass  # port not open yet
                time.sleep(0.2)
            assert seen[:1] == ["NOT_SERVING"] and seen[-1] == "SERVING", seen
            assert c.health("effllm.v1.GenerationService") == "SERVING"
        wait_serving(server, 10)

        # A stream in flight when SIGTERM arrives still finishes; afterwards health is NOT_SERVING.
        with server.client(timeout=60.0) as c:
            finals: list[pb.StreamFinal] = []

            def consume() -> None:
                for ch in c.stream(
                    "Tell me a story.", max_new_tokens=16, temperature=0.0, request_id="slow-1"
                ):
                    if ch.HasField("final"):
                        finals.append(ch.final)

            t = threading.Thread(target=consume)
            t.start()
            while c.stats().running == 0:
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert c.health() == "NOT_SERVING"
            try:
                c.generate("hi", max_new_tokens=1)
                raise AssertionError("a draining server accepted a new request")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
            t.join(60)
        assert finals and finals[0].usage.output_tokens > 0
        assert server.proc.wait(60) == 0
        assert "draining" in server.log() and "stopped" in server.log()
    finally:
        server.stop(signal.SIGKILL)
