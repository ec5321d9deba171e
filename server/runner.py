"""Admission and the clock around each request: between the service and the engine.

Invariant: a request either gets a slot (running <= max_concurrency), waits in a bounded queue, or is
refused at once with `resource_exhausted`; whatever ends it (finish, error, cancel) gives its slot back.
Its prompt is rendered and length-checked (`Engine.prepare`) and its adapter resolved before admission, so
a refused prompt or unknown adapter never holds a slot or a queue place.
Timings are measured here, so they mean the same for every engine.
An engine that dies under a request (alive() at its arrival, not when it fails: vLLM's EngineDeadError, the
hf engine's loop) ends it `unavailable` naming the variant, so clients retry; any other fault stays the
engine's own error (INTERNAL for that request only).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..telemetry.genai import RequestEnd, RequestObserver, RequestStart, RequestTrace, RouteNote
from .engines.base import EffllmError, Engine, GenerationRequest, Timings, TokenEvent, Usage

if TYPE_CHECKING:
    from .adapters.registry import AdapterRegistry


@dataclass
class Counters:
    requests_total: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    output_tokens_total: int = 0


class Runner:
    def __init__(
        self,
        engine: Engine,
        max_concurrency: int,
        queue_size: int,
        adapters: AdapterRegistry | None = None,
        observer: RequestObserver | None = None,
        on_finish: Callable[[TokenEvent, int], None] | None = None,
        model: str = "",
    ) -> None:
        self.engine = engine
        info = engine.info
        # variant, its parts, and the base model's name on this server ("": the served model's)
        self.label = (f"{info.precision}:{info.engine}", info.precision, info.engine, model)
        # called with each finished request's final event and the batch size it was scheduled into
        self.on_finish = on_finish
        self.adapters = adapters
        self.observer = observer  # telemetry: span, metrics and energy per request (None: off)
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self._slots = asyncio.Semaphore(max_concurrency)
        self._in_flight: set[str] = set()
        self.running = 0
        self.queued = 0
        self.counters = Counters()

    def _admit(self, request_id: str) -> None:
        if request_id in self._in_flight:
            raise EffllmError("invalid_argument", f"request_id: {request_id!r} is already in flight")
        if self.running + self.queued >= self.max_concurrency + self.queue_size:
            self.counters.requests_rejected += 1
            raise EffllmError(
                "resource_exhausted",
                f"server busy: {self.running} running and {self.queued} queued "
                f"(max_concurrency {self.max_concurrency}, queue_size {self.queue_size})",
            )

    async def run(
        self, request: GenerationRequest, route: RouteNote | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Render the prompt, resolve the adapter (a lease on one version, held until the request ends), then
        admit and run. `route`: why the request runs on this runner's variant (on its span)."""
        trace = self.observer.begin(_start(request, self.label)) if self.observer is not None else None
        if trace is not None and route is not None:
            trace.routed(route)
        lease = None
        try:
            request = self.engine.prepare(request)  # INVALID_ARGUMENT before the request takes a slot
            if request.adapter:
                if self.adapters is None:
                    raise EffllmError(
                        "not_found", f"adapter: {request.adapter!r} (this server has no adapters)"
                    )
                lease = self.adapters.acquire(request.adapter)  # NOT_FOUND before the request takes a slot
                request = replace(request, resolved_adapter=lease.spec)
                if trace is not None:
                    trace.adapter_resolved(lease.spec.key, lease.spec.content_sha256)
            # aclosing: a consumer that stops early frees the slot (and lets go of the adapter) now,
            # not when the GC finalises _run; only then is the lease released.
            async with aclosing(self._run(request, trace)) as events:
                async for event in events:
                    yield event
        except EffllmError as err:
            if trace is not None:
                trace.fail(err.code, err.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if trace is not None:
                trace.cancelled()
            raise
        except Exception as err:
            if trace is not None:
                trace.fail("internal", f"{type(err).__name__}: {err}")
            raise
        finally:
            if lease is not None:
                lease.release()

    async def _run(
        self, request: GenerationRequest, trace: RequestTrace | None
    ) -> AsyncGenerator[TokenEvent, None]:
        arrival = time.perf_counter()
        alive = self.engine.alive()  # a failure once it is no longer alive is its death, not a fault
        self._admit(request.request_id)
        self._in_flight.add(request.request_id)
        self.queued += 1
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while queued: counted as the ones cancelled while running are
            self._in_flight.discard(request.request_id)
            self.counters.requests_cancelled += 1
            self.counters.requests_total += 1
            raise
        finally:
            self.queued -= 1
        self.running += 1
        batch = self.running  # rows in this variant's batch once it joins (the router's batch_seen)
        scheduled = time.perf_counter()
        if trace is not None:
            trace.scheduled()
        first: float | None = None
        try:
            # aclosing: a request that ends early (cancel, consumer gone) aborts in the engine now, not when
            # the GC finalises the engine's stream, so the engine's batch slot is free by the time ours is.
            async with aclosing(self.engine.generate(request)) as stream:  # type: ignore[type-var]
                async for event in stream:
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
                            adapter=request.resolved_adapter.key if request.resolved_adapter else "",
                            timings=Timings(
                                queue_s=scheduled - arrival,
                                time_to_first_token_s=first_at - arrival,
                                decode_s=now - first_at,
                                total_s=now - arrival,
                            ),
                        )
                        if trace is not None:
                            trace.finish(_end(event))
                            event = _with_energy(event, trace)
                        if self.on_finish is not None:
                            self.on_finish(event, batch)
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.requests_cancelled += 1
            raise
        except EffllmError as err:
            if err.code != "unavailable":
                raise
            raise EffllmError("unavailable", f"variant {self.label[0]}: {err.message}") from err
        except Exception as err:
            if not alive or self.engine.alive():
                raise
            raise EffllmError(
                "unavailable",
                f"variant {self.label[0]}: its engine died ({type(err).__name__}) before this request "
                "finished; retry it",
            ) from err
        finally:
            self.running -= 1
            self.counters.requests_total += 1
            self._in_flight.discard(request.request_id)
            self._slots.release()


def _start(request: GenerationRequest, label: tuple[str, str, str, str]) -> RequestStart:
    s = request.sampling
    return RequestStart(
        request.request_id,
        request.messages is not None,
        s.max_new_tokens,
        s.temperature,
        s.top_p,
        request.adapter,
        *label,
    )


def _with_energy(event: TokenEvent, trace: RequestTrace) -> TokenEvent:
    """The final event with the request's attributed energy in its usage (when telemetry measured it)."""
    share = trace.energy
    if share is None:
        return event
    usage = event.usage or Usage(0, 0)
    return replace(event, usage=replace(usage, energy_joules=share.joules, energy_source=share.source))


def _end(event: TokenEvent) -> RequestEnd:
    usage, t = event.usage, event.timings
    assert t is not None and event.finish_reason is not None
    return RequestEnd(
        input_tokens=usage.input_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        finish_reason=event.finish_reason,
        adapter=event.adapter,
        queue_s=t.queue_s,
        time_to_first_token_s=t.time_to_first_token_s,
        decode_s=t.decode_s,
        total_s=t.total_s,
    )
