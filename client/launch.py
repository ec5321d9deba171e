"""Start a local `effllm serve` subprocess on a free loopback port and wait until it is SERVING.

Used by tests, benchmarks and load campaigns that bring their own server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .channel import ClientSecurity
from .client import EffllmClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    security: ClientSecurity | None = None  # how clients reach it (TLS, token); None: plaintext, no token

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw: object) -> EffllmClient:
        kw.setdefault("security", self.security)
        return EffllmClient(self.target, **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:  # a SIGKILLed server cannot stop vLLM's engine core: kill it too
                kill_children(self.proc.pid)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_children(self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def kill_children(pid: int) -> None:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


def start_server(
    *args: str,
    log_dir: Path,
    ready_timeout: float = 300.0,
    wait: bool = True,
    env: dict[str, str] | None = None,
    security: ClientSecurity | None = None,
    omp_default: bool = True,
) -> ServerProcess:
    """`effllm serve ARGS` on a free port. `omp_default`: one OpenMP thread unless the environment sets a
    count (below); False: exactly the caller's environment, as a user starting the server gets."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "effllm.cli.main", "serve", "--port", str(port), *args]
    with log_path.open("wb") as log:
        # NOTE: one OpenMP thread unless the caller's environment says otherwise: with 2 threads, vLLM's CPU
        # worker spins at every barrier, and on a shared, oversubscribed 2-core box 8 tokens took 13-16 s
        # against 0.6-2.4 s with one thread (measured side by side; see the reliability note).
        env = {**({"OMP_NUM_THREADS": "1"} if omp_default else {}), **os.environ, **(env or {})}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, port, log_path, security)
    if wait:
        wait_serving(server, ready_timeout)
    return server


def wait_serving(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with server.client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if client.health() == "SERVING":
                    return
            except Exception:
                pass
            time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise TimeoutError(f"server not SERVING after {timeout}s:\n{server.log()[-4000:]}")
