"""A request's budget (GenerateRequest.budget): the limits the server's router must meet and load campaigns
send, as one frozen dataclass both sides share.

Fields use short names (`max_ttft_s`, `max_tpot_s`, `max_j_per_token`, `min_quality`); `WIRE_FIELDS` maps
them to the proto's Budget fields. `Budget.parse` reads the command-line form
`max_ttft_s=0.5,max_tpot_s=0.1,max_j_per_token=2,min_quality=0.9` (effllm load --budget, bench scripts).
The server validates the wire message itself first (server/service.py `to_route`), so its refusals name
the wire field; the checks here are the same, so a Budget the server builds never raises.
Invariant: a Budget that exists is valid: every time and energy limit is finite and > 0, min_quality is in
0..1, None means no limit; a bad value raises ValueError naming the field (and the flag, from `parse`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Budget field -> GenerateRequest.budget field (proto effllm.v1.Budget)
WIRE_FIELDS = {
    "max_ttft_s": "max_time_to_first_token_s",
    "max_tpot_s": "max_time_per_output_token_s",
    "max_j_per_token": "max_joules_per_token",
    "min_quality": "min_quality",
}


def finite_number(flag: str, part: str, text: str) -> float:
    """`text` as a finite float, or ValueError naming the flag and the part of it at fault."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag} {part!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{flag} {part!r}: the value must be finite")
    return value


@dataclass(frozen=True)
class Budget:
    """Limits on what serves one request; each field None: no limit on that figure."""

    max_ttft_s: float | None = None
    max_tpot_s: float | None = None
    max_j_per_token: float | None = None
    min_quality: float | None = None  # relative to the best variant (best perplexity / its perplexity)

    def __post_init__(self) -> None:
        for key in ("max_ttft_s", "max_tpot_s", "max_j_per_token"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"budget {key}: must be > 0, got {value}")
        if self.min_quality is not None and not 0.0 <= self.min_quality <= 1.0:
            raise ValueError(f"budget min_quality: must be in [0, 1], got {self.min_quality}")

    @property
    def empty(self) -> bool:
        return all(
            v is None for v in (self.max_ttft_s, self.max_tpot_s, self.max_j_per_token, self.min_quality)
        )

    @classmethod
    def parse(cls, text: str, flag: str = "--budget") -> Budget | None:
        """`max_ttft_s=0.5,max_tpot_s=0.1,max_j_per_token=2,min_quality=0.9`; empty text: None."""
        kw: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = (s.strip() for s in part.partition("="))
            if key not in WIRE_FIELDS or not eq:
                raise ValueError(f"{flag} {part!r}: use {', '.join(f'{k}=X' for k in WIRE_FIELDS)}")
            if key in kw:
                raise ValueError(f"{flag} {part!r}: {key} is given twice")
            kw[key] = finite_number(flag, part, value)
        if not kw:
            if text.strip():
                raise ValueError(f"{flag} {text!r}: use KEY=VALUE,... e.g. max_ttft_s=0.5")
            return None
        try:
            return cls(**kw)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None

    def fields(self) -> dict[str, float]:
        """The proto's Budget fields that are set (GenerateRequest.budget)."""
        return {WIRE_FIELDS[k]: v for k, v in asdict(self).items() if v is not None}
