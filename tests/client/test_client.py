from __future__ import annotations

import pytest

from effllm.client import build_request


def test_prompt_request_carries_sampling() -> None:
    req = build_request("hi", max_new_tokens=5, temperature=0.0, seed=7, stop=["\n"], adapter="a@2")
    assert req.WhichOneof("input") == "prompt"
    assert req.sampling.max_new_tokens == 5
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert req.sampling.seed == 7 and list(req.sampling.stop) == ["\n"]
    assert not req.sampling.HasField("top_p")
    assert req.adapter == "a@2"


def test_messages_accept_tuples_and_dicts() -> None:
    req = build_request(messages=[("system", "be brief"), {"role": "user", "content": "hello"}])
    assert [(m.role, m.content) for m in req.messages.messages] == [("system", "be brief"), ("user", "hello")]


@pytest.mark.parametrize("kw", [{}, {"prompt": "x", "messages": [("user", "y")]}])
def test_exactly_one_input(kw: dict) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_request(**kw)
