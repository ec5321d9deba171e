"""Workloads for load campaigns: arrivals, prompt and output lengths, adapter popularity, load shapes.

Pure and seeded: nothing here does I/O beyond reading a prompts JSONL, nothing imports locust or grpc, and
the same `Workload` with the same seed yields the same request stream (so a campaign can be replayed and
the generators are unit-tested on their distributions). Each Locust process draws from its own stream,
`Workload.rng(stream)`, so workers are independent but reproducible.

Conventions:
- open-loop arrivals at `rate` req/s: Poisson (exponential gaps) or gamma with a burstiness factor b
  (shape b, scale 1/(rate·b): mean gap 1/rate, CV² = 1/b; b = 1 is Poisson, b < 1 burstier) — vLLM's
  benchmark convention, so numbers compare.
- adapter popularity: `uniform`, `zipf` (P(rank i) ∝ 1/i^α over the N names, α = 0 is uniform) or
  `round_robin` (one adapter per request, cycling: the worst case for adapter locality); `base_share` of
  requests goes to the base model before any adapter is drawn. A name written MODEL:NAME belongs to that
  base model: a request on a model draws among its own adapters (and the unqualified ones).
- shapes give a target (users for closed loop, req/s for open loop) as a function of elapsed time.
- objectives (loadtest/objectives.py): each request's objective is drawn from the mix on a generator of
  its own, so adding a mix never changes a seed's prompts, lengths or arrivals.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..common.budget import Budget
from .objectives import ModelMix, ObjectiveMix

# Short, frequent English words: with a Llama-style BPE vocabulary " word" is one token each, so a
# synthetic prompt of n words is ~n tokens (the server's usage.input_tokens records the exact count).
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "by",
    "at",
    "be",
    "this",
    "from",
    "or",
    "an",
    "have",
    "not",
    "they",
    "which",
    "you",
    "one",
    "had",
    "but",
    "his",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "more",
    "if",
    "no",
    "out",
    "so",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "first",
    "any",
    "like",
    "now",
    "my",
    "such",
    "make",
    "over",
    "our",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
]


@dataclass(frozen=True)
class LengthDist:
    """Integer lengths: fixed (mean), uniform [low, high], normal (mean, std) or lognormal (mean, sigma)."""

    kind: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    mean: float = 64.0
    spread: float = 0.0  # std (normal), sigma (lognormal)
    low: int = 1
    high: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal", "lognormal"):
            raise ValueError(f"length kind {self.kind!r}: use fixed, uniform, normal or lognormal")
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"lengths need 1 <= low <= high, got {self.low}..{self.high}")
        if self.mean <= 0 or self.spread < 0:
            raise ValueError("lengths need mean > 0 and spread >= 0")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """`64`, `fixed:64`, `uniform:32-256`, `normal:128,32`, `lognormal:128,0.5`."""
        kind, _, rest = text.partition(":")
        if not rest:
            kind, rest = "fixed", kind
        try:
            if kind == "fixed":
                n = int(rest)
                return cls("fixed", n, 0.0, n, n)
            if kind == "uniform":
                lo, hi = (int(x) for x in rest.split("-"))
                return cls("uniform", (lo + hi) / 2, 0.0, lo, hi)
            if kind in ("normal", "lognormal"):
                m, s = (float(x) for x in rest.split(","))
                return cls(kind, m, s)  # type: ignore[arg-type]
        except ValueError as err:
            raise ValueError(f"length {text!r}: {err}") from None
        raise ValueError(
            f"length {text!r}: use N, fixed:N, uniform:LO-HI, normal:MEAN,STD or lognormal:MEAN,SIGMA"
        )

    def sample(self, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
        size = 1 if n is None else n
        if self.kind == "fixed":
            x = np.full(size, self.mean)
        elif self.kind == "uniform":
            x = rng.integers(self.low, self.high + 1, size)
        elif self.kind == "normal":
            x = rng.normal(self.mean, self.spread, size)
        else:  # lognormal parametrised by its mean: mu = ln(mean) - sigma²/2
            x = rng.lognormal(math.log(self.mean) - self.spread**2 / 2, self.spread, size)
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64)

    def one(self, rng: np.random.Generator) -> int:
        return int(self.sample(rng)[0])


@dataclass(frozen=True)
class Arrivals:
    """Open-loop inter-arrival gaps at `rate` req/s (see the module docstring for `burstiness`)."""

    kind: Literal["poisson", "gamma"] = "poisson"
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "gamma"):
            raise ValueError(f"arrivals {self.kind!r}: use poisson or gamma")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    def gaps(self, rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 req/s, got {rate}")
        if self.kind == "poisson":
            return rng.exponential(1.0 / rate, n)
        return rng.gamma(self.burstiness, 1.0 / (rate * self.burstiness), n)

    def gap(self, rng: np.random.Generator, rate: float) -> float:
        return float(self.gaps(rng, rate, 1)[0])


@dataclass(frozen=True)
class AdapterMix:
    """Which adapter each request names ('' = base model)."""

    kind: Literal["none", "uniform", "zipf", "round_robin"] = "none"
    names: tuple[str, ...] = ()
    alpha: float = 1.0
    base_share: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "uniform", "zipf", "round_robin"):
            raise ValueError(f"adapter mix {self.kind!r}: use none, uniform, zipf or round_robin")
        if self.kind != "none" and not self.names:
            raise ValueError(f"adapter mix {self.kind!r} needs adapter names")
        if not 0.0 <= self.base_share <= 1.0:
            raise ValueError(f"base_share must be in [0, 1], got {self.base_share}")
        if self.alpha < 0:
            raise ValueError(f"zipf alpha must be >= 0, got {self.alpha}")
        object.__setattr__(self, "names", tuple(self.names))

    def probabilities(self) -> np.ndarray:
        """P(name i) among adapter-bound requests, in `names` order (rank 1 first)."""
        n = len(self.names)
        if self.kind == "zipf":
            w = 1.0 / np.arange(1, n + 1, dtype=float) ** self.alpha
            return w / w.sum()
        return np.full(n, 1.0 / n)

    def pick(self, rng: np.random.Generator, index: int, model: str = "") -> str:
        """`index` is the request's sequence number in its stream (used by round_robin). Names written
        MODEL:NAME belong to that base model: a request on `model` draws among its own (by their rank in
        `names`) and the unqualified ones, and goes to the base when it has none; the name sent is NAME."""
        if self.kind == "none" or (self.base_share and rng.random() < self.base_share):
            return ""
        if not any(":" in n for n in self.names):
            if self.kind == "round_robin":
                return self.names[index % len(self.names)]
            return self.names[int(rng.choice(len(self.names), p=self.probabilities()))]
        mine = [i for i, n in enumerate(self.names) if n.rpartition(":")[0] in ("", model)]
        u = rng.random()  # one draw whatever the model, so every mix keeps the stream's sequence
        if not mine:
            return ""
        if self.kind == "round_robin":
            i = mine[index % len(mine)]
        else:
            p = self.probabilities()[mine]
            i = mine[min(int(np.searchsorted(np.cumsum(p / p.sum()), u, side="right")), len(mine) - 1)]
        return self.names[i].rpartition(":")[2]


@dataclass(frozen=True)
class Shape:
    """A target over elapsed time: `step` (start, +step every `step_s`, up to end) or `ramp` (linear)."""

    kind: Literal["constant", "step", "ramp"] = "constant"
    start: float = 1.0
    end: float = 1.0
    duration_s: float = 60.0
    step_s: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "step", "ramp"):
            raise ValueError(f"shape {self.kind!r}: use constant, step or ramp")
        if self.duration_s <= 0 or self.step_s <= 0 or self.start < 0 or self.end < 0:
            raise ValueError("shape needs duration_s > 0, step_s > 0 and non-negative start/end")

    def value(self, t: float) -> float | None:
        """The target at `t` seconds, None once the shape is over."""
        if t >= self.duration_s:
            return None
        if self.kind == "constant":
            return self.start
        if self.kind == "ramp":
            return self.start + (self.end - self.start) * t / self.duration_s
        steps = max(1, math.ceil(self.duration_s / self.step_s) - 1)
        k = min(int(t // self.step_s), steps)
        return self.start + (self.end - self.start) * k / steps


@dataclass(frozen=True)
class Prompt:
    """One request's input: `prompt` (raw text) or `messages` ([(role, content)])."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_new_tokens: int | None = None  # from a JSONL line; overrides the output-length distribution


@dataclass(frozen=True)
class PromptSource:
    """`synthetic` (lengths in tokens), `jsonl` (a file of {"prompt"} or {"messages"} lines) or `chat` mix.

    chat: with probability `chat_share` a chat of 1..`max_turns` user turns (assistant turns between),
    whose user turns together hold the sampled length; otherwise a raw synthetic prompt.
    """

    kind: Literal["synthetic", "jsonl", "chat"] = "synthetic"
    lengths: LengthDist = field(default_factory=lambda: LengthDist("fixed", 32, 0, 32, 32))
    path: str = ""
    chat_share: float = 0.5
    max_turns: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "jsonl", "chat"):
            raise ValueError(f"prompts {self.kind!r}: use synthetic, jsonl or chat")
        if self.kind == "jsonl" and not self.path:
            raise ValueError("jsonl prompts need a path")
        if not 0.0 <= self.chat_share <= 1.0 or self.max_turns < 1:
            raise ValueError("chat needs chat_share in [0, 1] and max_turns >= 1")

    def load(self) -> tuple[Prompt, ...]:
        """The JSONL file's prompts (empty for generated kinds)."""
        if self.kind != "jsonl":
            return ()
        items = []
        for n, line in enumerate(Path(self.path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            mnt = row.get("max_new_tokens")
            if "messages" in row:
                turns = tuple((m["role"], m["content"]) for m in row["messages"])
                items.append(Prompt(messages=turns, max_new_tokens=mnt))
            elif "prompt" in row:
                items.append(Prompt(prompt=str(row["prompt"]), max_new_tokens=mnt))
            else:
                raise ValueError(f"{self.path}:{n}: a line needs 'prompt' or 'messages'")
        if not items:
            raise ValueError(f"{self.path}: no prompts")
        return tuple(items)


def synthetic_text(rng: np.random.Generator, n_tokens: int) -> str:
    words = rng.choice(len(_WORDS), n_tokens)
    return " ".join(_WORDS[i] for i in words)


@dataclass(frozen=True)
class RequestSpec:
    """What one virtual request sends."""

    index: int
    prompt: Prompt
    max_new_tokens: int
    adapter: str
    objective: str = ""  # from the workload's objective mix; "": the request states none
    model: str = ""  # from the workload's model mix; "": the server's first model


@dataclass(frozen=True)
class Workload:
    """Everything a campaign sends; JSON round-trips through `to_dict` / `from_dict`."""

    seed: int = 0
    mode: Literal["open", "closed"] = "open"
    rate: float = 1.0  # open loop, req/s over the whole campaign (split among processes)
    users: int = 1  # closed loop: concurrent users, each sends its next request when the last ends
    think_s: float = 0.0  # closed loop: pause between a user's requests
    arrivals: Arrivals = field(default_factory=Arrivals)
    prompts: PromptSource = field(default_factory=PromptSource)
    output: LengthDist = field(default_factory=lambda: LengthDist("fixed", 32, 0, 32, 32))
    adapters: AdapterMix = field(default_factory=AdapterMix)
    shape: Shape | None = None  # overrides rate (open) or users (closed) over time
    temperature: float = 0.0
    # True: every request decodes exactly its drawn output length (the API's ignore_eos); False: the length
    # is a cap and the model may stop earlier (the report counts the tokens actually generated).
    ignore_eos: bool = False
    # Each request's objective, drawn from this mix (None: requests state none); the same limits on all.
    objectives: ObjectiveMix | None = None
    budget: Budget | None = None
    # Each request's base model, drawn from this mix (None: requests name none, the server's first serves).
    models: ModelMix | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode {self.mode!r}: use open or closed")
        if self.mode == "open" and self.rate <= 0 and self.shape is None:
            raise ValueError("open loop needs rate > 0 req/s (or a shape)")
        if self.mode == "closed" and self.users < 1 and self.shape is None:
            raise ValueError("closed loop needs users >= 1 (or a shape)")
        if self.think_s < 0 or self.temperature < 0:
            raise ValueError("think_s and temperature must be >= 0")

    def rng(self, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def target(self, t: float) -> float | None:
        """Rate (open) or users (closed) at elapsed time t; None when the shape has ended."""
        if self.shape is not None:
            return self.shape.value(t)
        return self.rate if self.mode == "open" else float(self.users)

    def requests(self, stream: int = 0) -> RequestStream:
        return RequestStream(self, stream)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        d = dict(d)
        d["arrivals"] = Arrivals(**d.get("arrivals", {}))
        p = dict(d.get("prompts", {}))
        if "lengths" in p:
            p["lengths"] = LengthDist(**p["lengths"])
        d["prompts"] = PromptSource(**p)
        if "output" in d:
            d["output"] = LengthDist(**d["output"])
        a = dict(d.get("adapters", {}))
        a["names"] = tuple(a.get("names", ()))
        d["adapters"] = AdapterMix(**a)
        d["shape"] = Shape(**d["shape"]) if d.get("shape") else None
        d["objectives"] = ObjectiveMix(**d["objectives"]) if d.get("objectives") else None
        d["budget"] = Budget(**d["budget"]) if d.get("budget") else None
        d["models"] = ModelMix(**d["models"]) if d.get("models") else None
        return cls(**d)


class RequestStream:
    """An endless, seeded sequence of RequestSpecs and (open loop) arrival gaps for one process."""

    def __init__(self, workload: Workload, stream: int = 0) -> None:
        self.workload = workload
        self._rng = workload.rng(stream)
        self._gap_rng = workload.rng(10_000 + stream)  # gaps independent of request contents
        # objectives from their own generator: with or without a mix, the same prompts and lengths
        self._objective_rng = workload.rng(20_000 + stream)
        self._model_rng = workload.rng(30_000 + stream)  # models too: every mix sends the same requests
        self._jsonl = workload.prompts.load()
        self._index = 0

    def gap(self, rate: float) -> float:
        return self.workload.arrivals.gap(self._gap_rng, rate)

    def next_arrival(self, t: float, share: float = 1.0, dt: float = 0.01) -> float | None:
        """The arrival after time `t` (campaign clock, s) at `share` × the workload's rate; None once the
        rate (its shape) has ended. Under a shape the rate changes over time: a unit-mean gap is drawn and
        spent in operational time, ∫ rate dt (time rescaling: exact for Poisson, so a ramp really ramps)."""
        w = self.workload
        if w.shape is None:
            return t + self.gap(w.rate * share)
        budget = w.arrivals.gap(self._gap_rng, 1.0)
        while budget > 0:
            rate = w.target(t)
            if rate is None:
                return None
            budget -= max(rate, 0.0) * share * dt
            t += dt
        return t

    def next(self) -> RequestSpec:
        w, rng, i = self.workload, self._rng, self._index
        self._index += 1
        src = w.prompts
        if src.kind == "jsonl":
            prompt = self._jsonl[int(rng.integers(len(self._jsonl)))]
        else:
            n = src.lengths.one(rng)
            if src.kind == "chat" and rng.random() < src.chat_share:
                turns = int(rng.integers(1, src.max_turns + 1))
                sizes = [max(1, n // turns)] * turns
                messages: list[tuple[str, str]] = []
                for k, size in enumerate(sizes):
                    if k:
                        messages.append(("assistant", synthetic_text(rng, 8)))
                    messages.append(("user", synthetic_text(rng, size)))
                prompt = Prompt(messages=tuple(messages))
            else:
                prompt = Prompt(prompt=synthetic_text(rng, n))
        max_new = prompt.max_new_tokens or w.output.one(rng)
        objective = w.objectives.pick(self._objective_rng) if w.objectives else ""
        model = w.models.pick(self._model_rng) if w.models else ""
        return RequestSpec(i, prompt, max_new, w.adapters.pick(rng, i, model), objective, model)
