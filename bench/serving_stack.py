"""What our serving stack costs per token, without a model: CPU microseconds per streamed token.

A real `effllm` server (gRPC service, runner, telemetry as configured) runs in a child process around
an engine that costs nothing: it yields one token per event at once. `c` closed-loop streaming clients
in this process drive it. The CPU time of the server process and of this client process, divided by
the tokens streamed, is what the gRPC stream, the runner and telemetry add to every token on top of
the engine. With telemetry on and off, side by side:

    python bench/serving_stack.py --concurrency 1 8 --tokens 256 --out runs/bench-serving-stack.json

Invariant: the engine here does no work, so every CPU second measured is the stack's (or the client's).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _harness import closed_loop, header, machine_record, write_report


class ZeroEngine:
    """An engine that emits one token id per event, as fast as the event loop lets it."""

    def __init__(self) -> None:
        from effllm.server.engines.base import EngineInfo

        self.info = EngineInfo("zero", "0" * 16, "zero", "fp32", 4096, "cpu", 1, 4, ("fp32",))
        self._running = 0

    async def start(self) -> None:
        return None

    def alive(self) -> bool:
        return True

    def prepare(self, request: Any) -> Any:
        """One prompt id per byte of the text: no tokenizer, the serving stack alone is measured."""
        from dataclasses import replace

        return replace(request, prompt_ids=tuple((request.prompt or "x").encode()[:64]))

    def cpu_seconds(self) -> float:
        return 0.0

    async def score(self, token_ids: Any) -> list[float]:
        return [0.0 for _ in token_ids]

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        from effllm.server.engines.base import TokenEvent, Usage

        n = request.sampling.max_new_tokens
        self._running += 1
        try:
            for i in range(n - 1):
                await asyncio.sleep(0)  # one engine step per token: let other requests' events through
                yield TokenEvent(text="x", token_ids=(i % 1000,))
            yield TokenEvent("x", (1,), finish_reason="length", usage=Usage(4, n))
        finally:
            self._running -= 1

    def running(self) -> int:
        return self._running

    async def add_adapter(self, spec: Any) -> None:
        raise NotImplementedError

    async def remove_adapter(self, key: str) -> None:
        return None

    async def shutdown(self) -> None:
        return None


def serve_child(port: int, telemetry: bool, run_dir: str) -> None:
    from effllm.server.app import ServerConfig, serve
    from effllm.telemetry.tracing import config_from

    config = ServerConfig(port=port, max_concurrency=64)
    tel = config_from(no_telemetry=not telemetry, run_dir=run_dir, service_name="effllm-server")
    asyncio.run(serve(ZeroEngine(), config, None, tel))  # type: ignore[arg-type]


async def drive(target: str, c: int, requests: int, tokens: int) -> int:
    """The harness's closed loop: `requests` streams of `tokens` over `c` clients; tokens received."""
    one = {"prompt": "x", "max_new_tokens": tokens}
    loop = await closed_loop(target, c, [one] * max(requests, c), timeout=600, warm_up=one)
    if loop.failures:
        raise RuntimeError(f"{len(loop.failures)} requests failed: {loop.failures[:3]}")
    return loop.tokens


def measure(telemetry: bool, levels: list[int], requests: int, tokens: int, run_dir: Path) -> dict[str, Any]:
    import psutil

    from effllm.client.client import EffllmClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = mp.get_context("spawn").Process(target=serve_child, args=(port, telemetry, str(run_dir)))
    child.start()
    target = f"127.0.0.1:{port}"
    try:
        with EffllmClient(target, timeout=5.0) as probe:
            probe.wait_ready(120)
        server, me = psutil.Process(child.pid), psutil.Process()
        out = {}
        for c in levels:
            s0, m0, t0 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2]), time.perf_counter()
            n = asyncio.run(drive(target, c, requests, tokens))
            wall = time.perf_counter() - t0
            s1, m1 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2])
            out[str(c)] = {
                "tokens": n,
                "tokens_per_s": n / wall,
                "server_cpu_us_per_token": 1e6 * (s1 - s0) / n,
                "client_cpu_us_per_token": 1e6 * (m1 - m0) / n,
            }
        return out
    finally:
        child.terminate()
        child.join(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--requests", type=int, default=16, help="requests per level")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per request")
    ap.add_argument("--out", default="runs/bench-serving-stack.json")
    args = ap.parse_args()
    record = machine_record()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        name: measure(on, args.concurrency, args.requests, args.tokens, out.parent / f"stack-{name}")
        for name, on in (("telemetry on", True), ("telemetry off", False))
    }
    write_report(out, {"args": vars(args), "results": results}, record)
    print(f"{header(record)}; {args.tokens} tokens per request, zero-cost engine")
    print("| stack | c | tok/s | server CPU us/token | client CPU us/token |")
    print("|---|---:|---:|---:|---:|")
    for name, levels in results.items():
        for c, r in levels.items():
            print(
                f"| {name} | {c} | {r['tokens_per_s']:.0f} | {r['server_cpu_us_per_token']:.0f} | "
                f"{r['client_cpu_us_per_token']:.0f} |"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
