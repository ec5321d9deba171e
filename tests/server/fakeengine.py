"""A scripted in-process engine for the server-core tests: no model, no torch, every step observable.

The prompt goes through the real PromptRenderer (with a one-id-per-word tokenizer), so prepare refuses
exactly what a real engine refuses. What generate does is chosen by the request id's prefix:
- `hold-*`: one token, then wait until `release()` (a request that holds its slot as long as a test wants);
- `fail-*`: one token, then RuntimeError (an engine fault on that request);
- `slow-*`: `max_new_tokens` tokens, one every `token_interval_s` (a paced stream whose gaps a test measures);
- anything else: `max_new_tokens` tokens at once, finish "length".
`die()` kills it as vLLM's engine core dies: alive() turns False, every open `hold-*` stream and every later
generate raise `ScriptedEngineDead` (a plain exception, as vLLM's EngineDeadError is to the server).
Invariant: `inside` holds exactly the requests whose generate stream is open; `closed_early` the ones whose
stream was closed before it finished (the abort a real engine does to free its batch slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from effllm.server.engines.base import (
    AdapterSpec,
    EngineInfo,
    GenerationRequest,
    TokenEvent,
    Usage,
)
from effllm.server.engines.prompting import PromptRenderer
from effllm.telemetry.proctree import engine_threads

MAX_CONTEXT = 64


class ScriptedEngineDead(RuntimeError):
    """What generate raises once the engine died."""


class WordTokenizer:
    """One id per whitespace-separated word; a chat template that just joins the turns."""

    chat_template = "words"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]

    def apply_chat_template(self, turns: list[dict[str, str]], **_: object) -> list[int]:
        return self.encode(" ".join(f"{t['role']}: {t['content']}" for t in turns) + " assistant:")


class FakeEngine:
    def __init__(
        self, max_context: int = MAX_CONTEXT, model: str = "fake", fingerprint: str = "fake-fingerprint"
    ) -> None:
        self.info = EngineInfo(
            model=model,
            fingerprint=fingerprint,
            engine="fake",
            precision="fp32",
            max_context=max_context,
            device="cpu",
            parameters=1000,
            weight_bytes=4000,
            precisions=("fp32",),
        )
        self.loaded = asyncio.Event()  # start() returns once set; set it at once unless a test holds it
        self.loaded.set()
        self._released = asyncio.Event()
        self._died = asyncio.Event()
        self._renderer = PromptRenderer(WordTokenizer(), max_context)
        self.started = False
        self.dead = False
        self.shut_down = False
        self.calls: list[tuple[str, str]] = []  # ("prepare" | "generate", request_id) in call order
        self.inside: set[str] = set()
        self.closed_early: list[str] = []
        self.adapters: set[str] = set()
        self.token_interval_s = 0.02  # `slow-*` requests
        self.owner = f"fake-{id(self)}"  # its name in engine_threads()

    # --- test controls ----------------------------------------------------------------------------------
    def release(self) -> None:
        """Let every `hold-*` request (now and later) finish."""
        self._released.set()

    def die(self) -> None:
        self.dead = True
        self._died.set()

    async def _hold(self) -> None:
        """Until release() or die() (then raise, as a dead engine's open streams do)."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._released, self._died)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.dead:
            raise ScriptedEngineDead("scripted engine death")

    async def until_inside(self, request_id: str, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while request_id not in self.inside:
                await asyncio.sleep(0.005)

    # --- the Engine protocol ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.loaded.wait()
        self.started = True

    def alive(self) -> bool:
        return self.started and not self.dead and not self.shut_down

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        self.calls.append(("prepare", request.request_id))
        return self._renderer.prepare(request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rid = request.request_id
        self.calls.append(("generate", rid))
        assert request.prompt_ids is not None, "generate got a request the runner did not prepare"
        if self.dead:
            raise ScriptedEngineDead("scripted engine death")
        self.inside.add(rid)
        finished = False
        try:
            n = request.sampling.max_new_tokens
            if rid.startswith(("hold-", "fail-")):
                yield TokenEvent(text=" a", token_ids=(1,))
                if rid.startswith("fail-"):
                    raise RuntimeError(f"scripted engine fault in {rid}")
                await self._hold()
                n -= 1
            for i in range(n):
                await asyncio.sleep(self.token_interval_s if rid.startswith("slow-") else 0)
                last = i == n - 1
                yield TokenEvent(
                    text=" b",
                    token_ids=(2,),
                    finish_reason="length" if last else None,
                    usage=Usage(len(request.prompt_ids), request.sampling.max_new_tokens) if last else None,
                )
            finished = True
        finally:
            self.inside.discard(rid)
            if not finished:
                self.closed_early.append(rid)

    def running(self) -> int:
        return len(self.inside)

    def cpu_seconds(self) -> float:
        """The threads this engine claimed in engine_threads() (none: it decodes on the event loop for
        free; a test subclass claims the thread it burns CPU on)."""
        return engine_threads().seconds(self.owner)

    async def add_adapter(self, spec: AdapterSpec) -> None:
        self.adapters.add(spec.key)

    async def remove_adapter(self, key: str) -> None:
        self.adapters.discard(key)

    async def shutdown(self) -> None:
        self.shut_down = True

    async def score(self, token_ids: Sequence[int]) -> list[float]:
        """Every token gets `self.logprob` (tests set it per engine to tell variants' quality apart)."""
        return [float(getattr(self, "logprob", -1.0))] * (len(token_ids) - 1)
