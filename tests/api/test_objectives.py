"""api/objectives.py: the one vocabulary of objectives, derived from the proto enum."""

from __future__ import annotations

import pytest

from effllm.api.objectives import OBJECTIVES, objective_name, objective_value
from effllm.api.v1 import generation_pb2 as pb


def test_names_are_the_enum_and_round_trip() -> None:
    enum = {k.removeprefix("OBJECTIVE_").lower() for k, _ in pb.Objective.items()}
    assert set(OBJECTIVES) == enum - {"unspecified"}
    for name in OBJECTIVES:
        assert objective_name(objective_value(name)) == name
        assert objective_value(name.upper()) == objective_value(name)
    assert objective_value("") == objective_value("unspecified") == pb.OBJECTIVE_UNSPECIFIED
    assert objective_name(pb.OBJECTIVE_UNSPECIFIED) == ""
    assert objective_name(max(pb.Objective.values()) + 1) is None


def test_unknown_name_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="latency"):
        objective_value("fastest")


def test_every_user_of_objectives_shares_the_one_vocabulary() -> None:
    from effllm.client import cli as client_cli
    from effllm.loadtest import objectives as load
    from effllm.server import router

    assert router.OBJECTIVES is OBJECTIVES and client_cli.OBJECTIVES is OBJECTIVES
    assert (*OBJECTIVES, "unspecified") == load.OBJECTIVES
