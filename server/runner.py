"""Admission and the clock around each request: between the service and the engine.

Invariant: a request either gets a slot (running <= max_concurrency), waits in a bounded queue, or is
refused at once with `resource_exhausted`; whatever ends it (finish, error, cancel) gives its slot back.
Timings are measured here, so they mean the same for every engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .engines.base import Engine, EngineError, GenerationRequest, Timings, TokenEvent

if TYPE_CHECKING:
    from .adapters.registry import AdapterRegistry


@dataclass
class Counters:
    requests_total: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    output_tokens_total: int = 0


class Runner:
    def __init__(self, engine: Engine, max_concurrency: int, queue_size: int,
                 adapters: AdapterRegistry | None = None) -> None:
        self.engine = engine
        self.adapters = adapters
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self._slots = asyncio.Semaphore(max_concurrency)
        self._in_flight: set[str] = set()
        self.running = 0
        self.queued = 0
        self.counters = Counters()

    def _admit(self, request_id: str) -> None:
        if request_id in self._in_flight:
            raise EngineError("invalid_argument", f"request_id: {request_id!r} is already in flight")
        if self.running + self.queued >= self.max_concurrency + self.queue_size:
            self.counters.requests_rejected += 1
            raise EngineError(
                "resource_exhausted",
                f"server busy: {self.running} running and {self.queued} queued "
                f"(max_concurrency {self.max_concurrency}, queue_size {self.queue_size})",
            )

    async def run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Resolve the adapter (a lease on one version, held until the request ends), then admit and run."""
        if not request.adapter:
            async for event in self._run(request):
                yield event
            return
        if self.adapters is None:
            raise EngineError("failed_precondition", "adapter: this server runs without adapters")
        lease = self.adapters.acquire(request.adapter)  # NOT_FOUND before the request takes a slot
        inner = self._run(replace(request, resolved_adapter=lease.spec))
        try:
            async for event in inner:
                yield replace(event, adapter=lease.spec.key) if event.finish_reason is not None else event
        finally:
            await inner.aclose()  # the engine lets go of the adapter before the lease does
            lease.release()

    async def _run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        arrival = time.perf_counter()
        self._admit(request.request_id)
        self._in_flight.add(request.request_id)
        self.queued += 1
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while queued
            self._in_flight.discard(request.request_id)
            raise
        finally:
            self.queued -= 1
        self.running += 1
        scheduled = time.perf_counter()
        first: float | None = None
        try:
            async for event in self.engine.generate(request):
                now = time.perf_counter()
                if first is None and event.token_ids:
                    first = now
                if event.finish_reason is not None:
                    self.counters.output_tokens_total += event.usage.output_tokens if event.usage else 0
                    if event.finish_reason == "cancelled":
                        self.counters.requests_cancelled += 1
                    first_at = first if first is not None else now
                    event = replace(
                        event,
                        timings=Timings(
                            queue_s=scheduled - arrival,
                            time_to_first_token_s=first_at - arrival,
                            decode_s=now - first_at,
                            total_s=now - arrival,
                        ),
                    )
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.requests_cancelled += 1
            raise
        finally:
            self.running -= 1
            self.counters.requests_total += 1
            self._in_flight.discard(request.request_id)
            self._slots.release()
