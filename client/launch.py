"""Start a local `effllm serve` subprocess on a free loopback port and wait until it is SERVING.

Used by tests, benchmarks and load campaigns that bring their own server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw: object) -> EffllmClient:
        return EffllmClient(self.target, **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(
    *args: str,
    log_dir: Path,
    ready_timeout: float = 300.0,
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "effllm.cli.main", "serve", "--port", str(port), *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, log_path)
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
