"""The Budget the router and load campaigns share (common/budget.py): its wire names match the proto, it
refuses what the server refuses, and the command-line form round-trips onto the wire."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from effllm.api.v1 import generation_pb2 as pb
from effllm.common.budget import WIRE_FIELDS, Budget


def test_every_field_has_its_proto_field() -> None:
    assert [f.name for f in fields(Budget)] == list(WIRE_FIELDS)
    assert sorted(WIRE_FIELDS.values()) == sorted(f.name for f in pb.Budget.DESCRIPTOR.fields)


def test_the_command_line_form_reaches_the_wire() -> None:
    budget = Budget.parse("max_ttft_s=0.5, max_j_per_token=2,min_quality=0.9")
    assert budget == Budget(max_ttft_s=0.5, max_j_per_token=2.0, min_quality=0.9) and not budget.empty
    msg = pb.Budget(**budget.fields())
    assert msg.max_time_to_first_token_s == 0.5 and msg.max_joules_per_token == 2.0
    assert msg.min_quality == pytest.approx(0.9) and not msg.HasField("max_time_per_output_token_s")
    assert Budget().empty and Budget().fields() == {} and Budget.parse("  ") is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_ttft_s": 0.0}, "max_ttft_s"),
        ({"max_tpot_s": -1.0}, "max_tpot_s"),
        ({"max_j_per_token": math.inf}, "max_j_per_token"),
        ({"max_j_per_token": math.nan}, "max_j_per_token"),
        ({"min_quality": 1.01}, "min_quality"),
        ({"min_quality": -0.1}, "min_quality"),
        ({"min_quality": math.nan}, "min_quality"),
    ],
)
def test_a_bad_limit_is_refused_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"budget {field}"):
        Budget(**kwargs)


def test_the_bounds_themselves_are_allowed() -> None:
    assert Budget(min_quality=0.0).min_quality == 0.0 and Budget(min_quality=1.0).min_quality == 1.0
    assert Budget(max_ttft_s=1e-9).max_ttft_s == 1e-9
