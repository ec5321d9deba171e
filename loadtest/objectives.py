"""Objective mixes for load campaigns: what each simulated request asks the server to optimise.

`effllm load --objectives latency=0.4,energy=0.4,quality=0.2` gives every request one objective, drawn
from the mix by weight (`ObjectiveMix`); `--budget max_ttft_s=0.5,min_quality=0.9` gives every request the
same limits (`Budget`, common/budget.py: the same dataclass the server's router reads). Both travel inside
the Workload (JSON, to every Locust process) and map onto `GenerateRequest.objective` /
`GenerateRequest.budget` (loadtest/wire.py). The draw uses its own seeded generator, separate from
prompts, lengths and arrival gaps: the same seed gives the same arrivals, the same prompts AND the same
objectives, with or without a mix (so a campaign with objectives sends exactly the requests of the same
campaign without them, each with an objective added).

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
        names: list[str] = []
        weights: list[float] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = (s.strip() for s in part.partition("="))
            name = name.lower()
            if name not in OBJECTIVES:
                raise ValueError(f"{flag} {part!r}: unknown objective {name!r}; use {', '.join(OBJECTIVES)}")
            if name in names:
                raise ValueError(f"{flag} {part!r}: {name} is given twice")
            weight = finite_number(flag, part, value) if eq else 1.0
            if weight < 0:
                raise ValueError(f"{flag} {part!r}: a weight must be >= 0")
            names.append(name)
            weights.append(weight)
        if not names:
            if text.strip():
                raise ValueError(f"{flag} {text!r}: use NAME=WEIGHT,... e.g. latency=0.4,energy=0.6")
            return None
        if sum(weights) <= 0:
            raise ValueError(f"{flag} {text!r}: the weights sum to 0; at least one must be > 0")
        return cls(tuple(names), tuple(weights))

    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.weights, dtype=float)
        return w / w.sum()

    def pick(self, rng: np.random.Generator) -> str:
        """One objective, drawn with one uniform number (so each draw costs the generator the same)."""
        cumulative = np.cumsum(self.probabilities())
        i = int(np.searchsorted(cumulative, rng.random(), side="right"))
        return self.names[min(i, len(self.names) - 1)]  # min: rounding may leave cumulative[-1] < 1
