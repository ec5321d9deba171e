"""A request's objective: its name on our side, the proto's `Objective` enum on the wire.

Invariant: the names are derived from the enum (OBJECTIVE_<NAME>), so the server's router and service, the
client and load campaigns all accept exactly the objectives the wire contract has; "" means unspecified
(the server's default objective).
"""

from __future__ import annotations

from .v1 import generation_pb2 as pb

_PREFIX = "OBJECTIVE_"
OBJECTIVES: tuple[str, ...] = tuple(
    k.removeprefix(_PREFIX).lower() for k, v in pb.Objective.items() if v != pb.OBJECTIVE_UNSPECIFIED
)
_BY_VALUE: dict[int, str] = {
    v: ("" if v == pb.OBJECTIVE_UNSPECIFIED else k.removeprefix(_PREFIX).lower())
    for k, v in pb.Objective.items()
}


def objective_value(objective: str | int) -> int:
    """ "latency" -> pb.OBJECTIVE_LATENCY ...; "" (or "unspecified") -> OBJECTIVE_UNSPECIFIED; a number
    passes as is. Raises ValueError naming the objectives for an unknown name."""
    if isinstance(objective, int):
        return objective
    name = objective.lower()
    if not name or name == "unspecified":
        return pb.OBJECTIVE_UNSPECIFIED
    if name not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    return int(pb.Objective.Value(_PREFIX + name.upper()))


def objective_name(value: int) -> str | None:
    """pb.OBJECTIVE_ENERGY -> "energy"; OBJECTIVE_UNSPECIFIED -> ""; a number the enum lacks -> None."""
    return _BY_VALUE.get(value)
