"""A real TuningService (grpc.aio, loopback) in this process, on its own event loop in a daemon thread.

Fast to start (no `effllm tuner serve` process); its JobManager is the real one, so jobs that get a running
slot run real worker subprocesses. `root` holds the roots data/, out/, adapters/ and the jobs' folders.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc

from effllm.common.auth import AuthConfig
from effllm.tuner.jobs import JobManager
from effllm.tuner.limits import TunerLimits
from effllm.tuner.policy import TunerPolicy
from effllm.tuner.service import start_server

T = TypeVar("T")


class InProcessTuner:
    def __init__(
        self,
        root: Path,
        limits: TunerLimits,
        *,
        auth: AuthConfig | None = None,
        hub_data: bool = False,
        servers: tuple[str, ...] = ("local=127.0.0.1:1",),
    ) -> None:
        self.root = root
        for name in ("data", "out", "adapters"):
            (root / name).mkdir(exist_ok=True)
        self.policy = TunerPolicy.create(
            root / "data", root / "out", root / "adapters", servers, hub_data=hub_data
        )
        self.manager = JobManager(root / "jobs", limits)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.call(self._start(auth))
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run `coro` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, auth: AuthConfig | None) -> tuple[grpc.aio.Server, int]:
        server, port, _ = await start_server("127.0.0.1", 0, self.manager, self.policy, auth=auth)
        return server, port

    async def _stop(self) -> None:
        await self.manager.shutdown()  # cancels every unfinished job: queued ones at once, workers stopped
        await self.server.stop(grace=1.0)

    def close(self) -> None:
        self.call(self._stop(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
