"""The held-out text set and the torch-free perplexity arithmetic behind every quality figure.

Written for this purpose (no model saw it in training). loadtest/quality.py scores a precision with
transformers in its own process; the server scores each of its variants at start-up on that variant's own
engine (Engine.score: per-token log-probabilities); both turn log-probabilities into a perplexity here.
Invariant: no torch, no imports of ours beyond the standard library; the texts never change silently (a
change makes old and new quality figures incomparable).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

HELD_OUT = (
    "The harbour town woke slowly. Fishing boats came in before dawn, and by seven the market stalls were "
    "full of crates of mackerel, crabs and mussels. The baker on the corner opened his shutters, and the "
    "smell of fresh bread drifted down to the quay, where children waited for the school bus.",
    "To replace a bicycle tyre, first release the brake and remove the wheel. Push the valve into the rim, "
    "then use two tyre levers to lift one side of the tyre over the edge. Pull out the old tube, check the "
    "inside of the tyre for sharp objects, fit the new tube and work the tyre back onto the rim by hand.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower. Climbers who "
    "cook pasta on a mountain therefore need more time, since the water never gets as hot as it would at "
    "sea level. Pressure cookers solve the problem by raising the pressure inside the pot.",
    "The committee met on Tuesday to discuss the new library. Most members agreed that the building should "
    "have a quiet reading room, a children's corner and space for evening classes. The budget, however, "
    "was smaller than expected, so the architects were asked to prepare a simpler design.",
    "A good night's sleep helps memory. During deep sleep the brain replays what happened during the day "
    "and stores the important parts. People who sleep too little often find it harder to concentrate, "
    "and they make more mistakes in tasks that need careful attention.",
    "She opened the old letter carefully. The paper was yellow and the ink had faded, but the handwriting "
    "was still clear. It was from her grandmother, written the summer before the war, describing a long "
    "walk through the hills and a picnic beside a river that no longer exists.",
)


def perplexity(logprobs_per_text: Iterable[Sequence[float]]) -> tuple[float, int]:
    """(perplexity, tokens scored): exp of the mean negative log-probability, token-weighted over the
    texts. Each sequence holds the natural-log probability of every predicted token of one text."""
    total, count = 0.0, 0
    for logprobs in logprobs_per_text:
        for lp in logprobs:
            if not math.isfinite(lp):
                raise ValueError(f"log-probability {lp} is not finite")
            total -= lp
            count += 1
    if count == 0:
        raise ValueError("no tokens scored")
    return math.exp(total / count), count


# Quality differences smaller than this are not differences: the held-out set is ~350 tokens, and on it
# fp32 and bf16 differ by ~0.05 % in perplexity, in either direction from one CPU's kernels to another's,
# while a real loss (int4) costs ~30 %. The router treats variants within this of the best as equally good
# (and then picks the faster); the objectives bench counts them all as "the best-quality variant".
QUALITY_RESOLUTION = 0.01


def equally_good(quality: float, best: float) -> bool:
    """`quality` is as good as `best` at the resolution the held-out set can measure."""
    return quality >= best - QUALITY_RESOLUTION


def relative_quality(perplexities: dict[str, float]) -> dict[str, float]:
    """name -> best (lowest) perplexity / this one's: 1.0 for the best, lower for the others."""
    if not perplexities:
        return {}
    best = min(perplexities.values())
    return {name: best / ppl if ppl > 0 else 0.0 for name, ppl in perplexities.items()}
