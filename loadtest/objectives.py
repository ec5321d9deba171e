"""Objective and model mixes for load campaigns: what each simulated request asks the server to optimise,
and which of the server's base models it runs on.

`effllm load --objectives latency=0.4,energy=0.4,quality=0.2` gives every request one objective, drawn
from the mix by weight (`ObjectiveMix`); `--budget max_ttft_s=0.5,min_quality=0.9` gives every request the
same limits (`Budget`, common/budget.py: the same dataclass the server's router reads). Both travel inside
the Workload (JSON, to every Locust process) and map onto `GenerateRequest.objective` /
`GenerateRequest.budget` (loadtest/wire.py). The draw uses its own seeded generator, separate from
prompts, lengths and arrival gaps: the same seed gives the same arrivals, the same prompts AND the same
objectives, with or without a mix (so a campaign with objectives sends exactly the requests of the same
campaign without them, each with an objective added).

`effllm load --models a=0.7,b=0.3` gives every request one base model (`ModelMix`, the same weighted draw on
a generator of its own: the same seed sends every model mix the same arrivals, prompts and lengths).

Pure: no locust, no grpc. Invariant: a bad value raises ValueError naming the flag and the part at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..api.objectives import OBJECTIVES as WIRE_OBJECTIVES
from ..common.budget import finite_number

# What a request may state (api/objectives.py, from the proto's `Objective` enum); "unspecified" leaves the
# choice to the server's default policy.
OBJECTIVES = (*WIRE_OBJECTIVES, "unspecified")


@dataclass(frozen=True)
class ObjectiveMix:
    """Objective names and their weights (any non-negative scale; normalised when drawn)."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.names or len(self.names) != len(self.weights):
            raise ValueError("objectives: give one weight per objective name")
        unknown = [n for n in self.names if n not in OBJECTIVES]
        if unknown:
            raise ValueError(f"objectives: unknown {unknown[0]!r}; use {', '.join(OBJECTIVES)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("objectives: each objective may appear once")
        if any(w < 0 or not math.isfinite(w) for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError("objectives: weights must be finite, >= 0 and sum to more than 0")

    @classmethod
    def parse(cls, text: str, flag: str = "--objectives") -> ObjectiveMix | None:
        """`latency=0.4,energy=0.4,quality=0.2` (a bare name weighs 1); empty text: None (no objective)."""
        parsed = _weights(
            text, flag, "latency=0.4,energy=0.6", lower=True, known=OBJECTIVES, what="objective"
        )
        return cls(*parsed) if parsed else None

    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.weights, dtype=float)
        return w / w.sum()

    def pick(self, rng: np.random.Generator) -> str:
        """One objective, drawn with one uniform number (so each draw costs the generator the same)."""
        cumulative = np.cumsum(self.probabilities())
        i = int(np.searchsorted(cumulative, rng.random(), side="right"))
        return self.names[min(i, len(self.names) - 1)]  # min: rounding may leave cumulative[-1] < 1


@dataclass(frozen=True)
class ModelMix:
    """Base-model names (as the server's ListModels gives them) and their weights."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.names or len(self.names) != len(self.weights) or len(set(self.names)) != len(self.names):
            raise ValueError("models: give one weight per model name, each name once")
        if any(w < 0 or not math.isfinite(w) for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError("models: weights must be finite, >= 0 and sum to more than 0")

    @classmethod
    def parse(cls, text: str, flag: str = "--models") -> ModelMix | None:
        """`a=0.7,b=0.3` (a bare name weighs 1); empty text: None (requests name no model)."""
        parsed = _weights(
            text, flag, "smollm2-135m=0.7,gemma3-270m=0.3", lower=False, known=None, what="model"
        )
        return cls(*parsed) if parsed else None

    def pick(self, rng: np.random.Generator) -> str:
        """One model, drawn with one uniform number."""
        w = np.asarray(self.weights, dtype=float)
        i = int(np.searchsorted(np.cumsum(w / w.sum()), rng.random(), side="right"))
        return self.names[min(i, len(self.names) - 1)]


def _weights(
    text: str, flag: str, example: str, *, lower: bool, known: tuple[str, ...] | None, what: str
) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
    """`NAME=W,NAME,...` -> (names, weights); None for empty text. ValueError names the flag and part."""
    names: list[str] = []
    weights: list[float] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        name = name.lower() if lower else name
        if known is not None and name not in known:
            raise ValueError(f"{flag} {part!r}: unknown {what} {name!r}; use {', '.join(known)}")
        if not name:
            raise ValueError(f"{flag} {part!r}: a {what} name is missing")
        if name in names:
            raise ValueError(f"{flag} {part!r}: {name} is given twice")
        weight = finite_number(flag, part, value) if eq else 1.0
        if weight < 0:
            raise ValueError(f"{flag} {part!r}: a weight must be >= 0")
        names.append(name)
        weights.append(weight)
    if not names:
        if text.strip():
            raise ValueError(f"{flag} {text!r}: use NAME=WEIGHT,... e.g. {example}")
        return None
    if sum(weights) <= 0:
        raise ValueError(f"{flag} {text!r}: the weights sum to 0; at least one must be > 0")
    return tuple(names), tuple(weights)
