"""Request validation in the service layer (no engine): each bad field is named."""

from __future__ import annotations

import pytest

from effllm.client import build_request
from effllm.server.engines.base import EffllmError
from effllm.server.service import Limits, to_request, to_route

CTX = 1024


def check(req, match: str) -> None:
    with pytest.raises(EffllmError) as info:
        to_request(req, Limits(), CTX)
    assert info.value.code == "invalid_argument"
    assert match in info.value.message


def test_defaults_fill_in() -> None:
    r = to_request(build_request("hello"), Limits(default_max_new_tokens=17), CTX)
    assert r.sampling.max_new_tokens == 17 and r.sampling.temperature == 1.0 and r.sampling.top_p == 1.0
    assert r.sampling.seed is None and r.prompt == "hello" and len(r.request_id) == 32


def test_greedy_and_seed_zero_are_kept() -> None:
    r = to_request(build_request("x", temperature=0.0, seed=0), Limits(), CTX)
    assert r.sampling.temperature == 0.0 and r.sampling.seed == 0


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [("robot", "hi")]}, "messages[0].role"),
        ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": CTX}, "max_new_tokens"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "top_p": 0.0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -3}, "top_k"),
        ({"prompt": "x", "repetition_penalty": 0.0}, "repetition_penalty"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
        ({"prompt": "x", "adapter": "../etc"}, "adapter"),
        ({"prompt": "x", "adapter": "a@b@c"}, "adapter"),
        ({"prompt": "x", "request_id": "has space"}, "request_id"),
    ],
)
def test_bad_fields_are_named(kw: dict, field: str) -> None:
    if kw.get("messages") == []:
        req = build_request(messages=[("user", "x")])
        del req.messages.messages[:]
        check(req, field)
        return
    check(build_request(**kw), field)


def test_no_input_at_all() -> None:
    from effllm.api.v1 import generation_pb2 as pb

    check(pb.GenerateRequest(), "input")


def test_server_limit_on_new_tokens() -> None:
    with pytest.raises(EffllmError, match="limit of 64"):
        to_request(build_request("x", max_new_tokens=65), Limits(max_new_tokens=64), CTX)


def test_min_quality_message_tells_the_true_range() -> None:
    """0 is a valid min_quality (no floor): its refusal says 0..1, not "> 0" (the message on main)."""
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(EffllmError) as err:
            to_route(build_request("a", budget={"min_quality": bad}))
        assert err.value.message.startswith("budget.min_quality:") and "0..1" in err.value.message
        assert "> 0" not in err.value.message
    assert to_route(build_request("a", budget={"min_quality": 0.0}))[1].min_quality == 0.0
