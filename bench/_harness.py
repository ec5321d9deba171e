"""The bench harness every bench/ script and scripts/soak.py share: the machine and load a figure was taken
on, a real `effllm serve`, the closed-loop driver, and the JSON a run writes.

    from _harness import closed_loop, machine_record, serve, write_report    (bench/ is on sys.path when a
                                                                              script runs; soak adds it)

- `machine_record()`: lscpu's CPU model and the flags that decide precision (telemetry.machine), the CPU
  count, the load average and the OpenMP/MKL thread settings, for the head of every table and JSON.
- `serve(*flags, logs=...)`: a real server on a free port, SERVING when it returns (client.launch).
- `closed_loop(target, c, requests)`: `c` streaming clients pull requests from one queue until it is
  empty; per request, the token ids the client received (not what the server says it sent), its TTFT as
  the client saw it, and failures counted with their status (a benchmark keeps going and reports them).
- `write_report(path, doc, record)`: the JSON, with the machine record and the load average at the end.
Invariant: a bench script has no driver, machine description or server launcher of its own
(tests/bench/test_harness.py fails if one appears), so every table says the same things the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from effllm.client import AsyncEffllmClient
from effllm.client.launch import ServerProcess, start_server
from effllm.telemetry.machine import load_average, machine


def machine_record() -> dict[str, Any]:
    """What a figure was measured on, and how busy the machine was as the run began."""
    m = machine()
    return {
        "cpu_model": m.cpu_model,
        "cpu_flags": list(m.cpu_flags),
        "cpu_count": m.cores,
        "load_avg": load_average(),
        # the launcher gives a server one OpenMP thread unless this environment sets another count
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (launcher default)"),
        "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"),
    }


def header(record: Mapping[str, Any]) -> str:
    """The line every table starts with: the CPU, its bf16/int8 flags, the CPU count, the load average."""
    flags = ", ".join(record.get("cpu_flags") or ()) or "no bf16/int8 flags"
    load = " ".join(f"{x:.2f}" for x in record["load_avg"])
    end = record.get("load_avg_end")
    after = f" -> {' '.join(f'{x:.2f}' for x in end)}" if end else ""
    return f"CPU {record['cpu_model']} ({flags}), {record['cpu_count']} CPUs; load average {load}{after}"


def write_report(path: Path, doc: dict[str, Any], record: dict[str, Any]) -> None:
    """`doc` as JSON at `path`, under "machine" the record with the load average now."""
    record["load_avg_end"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": record, **doc}, indent=2, default=str))


def serve(
    *flags: str,
    logs: Path,
    ready_timeout: float = 900.0,
    as_user: bool = False,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """A real `effllm serve FLAGS` on a free port, SERVING when this returns; the caller stops it.
    `as_user`: this environment as it is (no launcher OpenMP default), as a user starts a server;
    `env`: variables set on top."""
    return start_server(
        *flags, log_dir=logs, ready_timeout=ready_timeout, omp_default=not as_user, env=dict(env or {})
    )


@dataclass
class Loop:
    """One closed-loop run: per finished request (in finishing order) the token ids received and the
    client-side TTFT; failures as "CODE: details"."""

    counts: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ttft_p50_s(self) -> float | None:
        return statistics.median(self.ttft_s) if self.ttft_s else None

    def exact(self, n: int, expected: int) -> bool:
        """Every one of `n` requests finished and received exactly `expected` tokens (equal work)."""
        return not self.failures and len(self.counts) == n and all(c == expected for c in self.counts)


async def closed_loop(
    target: str,
    concurrency: int,
    requests: Sequence[Mapping[str, Any]],
    *,
    timeout: float = 900.0,
    warm_up: Mapping[str, Any] | None = None,
) -> Loop:
    """`concurrency` streaming clients over one channel, each sending its next request (keyword arguments
    of `AsyncEffllmClient.stream`: prompt, adapter, max_new_tokens, ...) as its last one ends, until the
    list is empty. `warm_up`: one request first, outside the timing."""
    queue = list(reversed(requests))
    loop = Loop()

    async def worker(client: AsyncEffllmClient) -> None:
        while queue:
            request = dict(queue.pop())
            received, sent, first = 0, time.perf_counter(), None
            try:
                async for chunk in client.stream(**request):
                    if chunk.token_ids and first is None:
                        first = time.perf_counter() - sent
                    received += len(chunk.token_ids)
            except grpc.aio.AioRpcError as err:  # counted and reported: the run goes on
                loop.failures.append(f"{err.code().name}: {err.details()}")
                continue
            loop.counts.append(received)
            if first is not None:
                loop.ttft_s.append(first)

    async with AsyncEffllmClient(target, timeout=timeout) as client:
        if warm_up is not None:
            async for _ in client.stream(**warm_up):
                pass
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(max(concurrency, 1))))
        loop.seconds = time.perf_counter() - t0
    return loop
