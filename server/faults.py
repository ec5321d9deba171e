"""Failpoints for fault tests: make the engine raise mid-stream for chosen requests. Off unless configured.

`EFFLLM_FAILPOINTS="engine_raise_prefix=fault-,engine_raise_after=2"` makes every request whose id starts
with `fault-` raise RuntimeError inside the engine stream after 2 events, exactly where a real engine bug
would surface; requests with other ids are untouched. The server must turn that into INTERNAL for the one
request, free its slot (the wrapped stream is closed, which aborts it in the engine) and keep the rest of the
batch going. `engine_delay_prefix=slow-,engine_delay_s=3600` makes `slow-*` requests stall that long
inside the engine (holding their slot) before their first token: a request that cannot finish in time,
for the request-time cap. `process_exit_prefix=die-` makes the whole process exit at once when a `die-*`
request reaches the engine (a cluster replica killed mid-traffic, tests/e2e/test_cluster.py); with
`process_exit_once=PATH` only the first process to create PATH exits (the retried request then succeeds).
Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from .engines.base import Engine, GenerationRequest, TokenEvent

ENV = "EFFLLM_FAILPOINTS"
log = logging.getLogger("effllm.server.faults")


@dataclass(frozen=True)
class Failpoints:
    engine_raise_prefix: str = ""
    engine_raise_after: int = 1
    engine_delay_prefix: str = ""
    engine_delay_s: float = 0.0
    process_exit_prefix: str = ""
    process_exit_once: str = ""

    def __post_init__(self) -> None:
        if self.engine_raise_after < 0 or self.engine_delay_s < 0:
            raise ValueError("engine_raise_after and engine_delay_s must be >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Failpoints | None:
        text = (os.environ if env is None else env).get(ENV, "").strip()
        if not text:
            return None
        fields: dict[str, Any] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key in (
                "engine_raise_prefix",
                "engine_delay_prefix",
                "process_exit_prefix",
                "process_exit_once",
            ):
                fields[key] = value.strip()
            elif key == "engine_raise_after":
                fields[key] = int(value)
            elif key == "engine_delay_s":
                fields[key] = float(value)
            else:
                raise ValueError(f"${ENV}: unknown failpoint {key!r}")
        return cls(**fields)


class FaultyEngine:
    """The wrapped engine, except that matching requests raise after `engine_raise_after` events."""

    def __init__(self, inner: Engine, failpoints: Failpoints) -> None:
        self.inner = inner
        self.failpoints = failpoints
        self.info = inner.info

    def __getattr__(self, name: str) -> Any:  # start, running, adapters, shutdown ... go to the real engine
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        fp = self.failpoints
        doomed = bool(fp.engine_raise_prefix) and request.request_id.startswith(fp.engine_raise_prefix)
        slow = bool(fp.engine_delay_prefix) and request.request_id.startswith(fp.engine_delay_prefix)
        if fp.process_exit_prefix and request.request_id.startswith(fp.process_exit_prefix) and _first(fp):
            log.error("failpoint: process exit on %s", request.request_id)
            os._exit(1)
        # aclosing: the raise below must close (and so abort) the real engine stream at once, not at GC.
        if slow:  # stall before the engine sees it: a per-token delay would not do (the engine decodes on)
            await asyncio.sleep(fp.engine_delay_s)
        async with contextlib.aclosing(self.inner.generate(request)) as events:  # type: ignore[type-var]
            sent = 0
            async for event in events:
                if doomed and sent >= fp.engine_raise_after:
                    raise RuntimeError(f"failpoint: engine fault injected into {request.request_id}")
                yield event
                sent += 1


def _first(fp: Failpoints) -> bool:
    """True for the one process that gets to exit (every one, without process_exit_once)."""
    if not fp.process_exit_once:
        return True
    try:
        os.close(os.open(fp.process_exit_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def maybe_inject(engine: Engine) -> Engine:
    failpoints = Failpoints.from_env()
    if failpoints is None:
        return engine
    log.warning("failpoints active (%s): for fault tests only", failpoints)
    return FaultyEngine(engine, failpoints)  # type: ignore[return-value]
