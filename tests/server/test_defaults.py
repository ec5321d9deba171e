"""The model's sampling defaults (generation_config.json) and how unset request fields take them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effllm.client import build_request
from effllm.server.defaults import SamplingDefaults, has_chat_template, load_sampling_defaults, parse
from effllm.server.service import Limits, to_request

CTX = 1024


def test_keys_the_file_sets_become_defaults() -> None:
    d = parse({"temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "max_new_tokens": 7})
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_new_tokens) == (0.6, 0.9, 50, 1.1, 7)
    assert set(d.from_model) == {"temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"}


def test_do_sample_false_is_greedy_and_absent_keys_keep_builtins() -> None:
    d = parse({"do_sample": False, "temperature": 0.7, "bos_token_id": 1})
    assert d.temperature == 0.0 and d.top_p == 1.0 and d.top_k == 0 and d.max_new_tokens is None
    assert parse({"bos_token_id": 1, "eos_token_id": 2}) == SamplingDefaults()


@pytest.mark.parametrize(
    "raw",
    [
        {"temperature": -1},
        {"temperature": "hot"},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": 2.5},
        {"top_k": True},
        {"repetition_penalty": 0},
        {"max_new_tokens": 0},
        {"temperature": float("nan")},
    ],
)
def test_hostile_values_are_ignored(raw: dict) -> None:
    assert parse(raw) == SamplingDefaults()


def test_load_from_dir(tmp_path: Path) -> None:
    assert load_sampling_defaults(tmp_path) == SamplingDefaults()  # no file
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    assert load_sampling_defaults(tmp_path) == SamplingDefaults()  # not an object
    (tmp_path / "generation_config.json").write_text("{not json")
    assert load_sampling_defaults(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 20}))
    assert load_sampling_defaults(tmp_path).top_k == 20
    assert not has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert has_chat_template(tmp_path)


@pytest.mark.model
def test_the_embedded_model_ships_a_chat_template() -> None:
    from effllm.common.model import resolve_model

    assert has_chat_template(resolve_model(None).path)


def test_unset_fields_take_the_model_defaults_and_set_ones_win() -> None:
    d = SamplingDefaults(temperature=0.0, top_p=0.8, top_k=40, repetition_penalty=1.2)
    s = to_request(build_request("x"), Limits(), CTX, d).sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.0, 0.8, 40, 1.2)
    s = to_request(
        build_request("x", temperature=0.5, top_p=1.0, top_k=0, repetition_penalty=1.0), Limits(), CTX, d
    ).sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.5, 1.0, 0, 1.0)


def test_explicit_zero_temperature_is_greedy_over_a_sampling_default() -> None:
    d = SamplingDefaults(temperature=0.9)
    assert to_request(build_request("x", temperature=0.0), Limits(), CTX, d).sampling.temperature == 0.0
    assert to_request(build_request("x"), Limits(), CTX, d).sampling.temperature == 0.9


def test_build_request_leaves_unset_fields_unset() -> None:
    s = build_request("x").sampling
    assert not any(s.HasField(f) for f in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"))
    assert s.max_new_tokens == 0
    s = build_request("x", top_k=0, temperature=0.0).sampling
    assert s.HasField("top_k") and s.top_k == 0 and s.HasField("temperature")
