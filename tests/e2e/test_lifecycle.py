"""A server's life: NOT_SERVING while the model loads (generation refused, not queued), SERVING after; a
first SIGTERM drains (a long stream in flight keeps it alive), a second one stops it at once (exit 1, the
stream ends UNAVAILABLE, vLLM's engine processes die with it). A drain that ends by itself (in-flight
streams finish, exit 0) is test_replicas' survivor."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import psutil

from ..serverproc import start_server, wait_serving


def test_health_goes_not_serving_to_serving_and_a_second_signal_stops_at_once(logs_dir: Path) -> None:
    server = start_server(
        "--engine",
        "vllm",
        "--precision",  # pinned: `auto` is bf16 on a CPU with native bf16, and these tests compare fp32
        "fp32",
        "--kv-cache-gib",
        "0.25",
        "--max-context",
        "512",
        "--grace",
        "120",
        log_dir=logs_dir,
        wait=False,
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
                        # Generation is refused while the model loads, not queued. The refusal is immediate,
                        # but while the model loads a loaded 2-core box can take seconds to answer anything
                        # (seen: over 2 s at load average 10); a queued request would still wait for the load.
                        try:
                            c.generate("hi", max_new_tokens=1, timeout=10.0)
                        except grpc.RpcError as err:
                            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                except grpc.RpcError:
                    pass  # port not open yet
                time.sleep(0.2)
            assert seen[:1] == ["NOT_SERVING"] and seen[-1] == "SERVING", seen
            assert c.health("effllm.v1.GenerationService") == "SERVING"
        wait_serving(server, 10)

        # First SIGTERM: draining, the long stream keeps the server alive; second SIGTERM: exit at once.
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert children, "expected vLLM's engine-core process"
        got_token = threading.Event()
        error: list[str] = []

        def stream() -> None:
            with server.client(timeout=120) as c:
                try:
                    for _ in c.stream("Count from 1 to 500: 1, 2,", max_new_tokens=400, temperature=0):
                        got_token.set()
                except grpc.RpcError as err:
                    error.append(err.code().name)

        t = threading.Thread(target=stream)
        t.start()
        assert got_token.wait(240)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # first signal: draining, the long stream keeps it alive
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(10)
        print(f"second signal: exit {rc} after {time.monotonic() - t0:.2f} s")
        assert rc == 1
        t.join(10)
        assert error == ["UNAVAILABLE"]
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        server.stop(signal.SIGKILL)
