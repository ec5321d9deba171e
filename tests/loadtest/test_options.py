"""The `--effllm-*` Locust options -> LoadConfig mapping (pure, no Locust) and tokens counted as streamed."""

from __future__ import annotations

import argparse

import pytest

from effllm.loadtest.options import UNBOUNDED_S, config_from_options, targets_from_host
from effllm.loadtest.report import throughput_series, token_times


def test_closed_loop_by_default_open_with_a_rate() -> None:
    closed = config_from_options(argparse.Namespace(), "127.0.0.1:1", users=3)
    assert closed.workload.mode == "closed" and closed.workload.users == 3
    assert closed.duration_s == UNBOUNDED_S and closed.run_dir == "" and closed.stream
    ns = argparse.Namespace(
        effllm_rate="2.5", effllm_adapters="a,b", effllm_popularity="zipf", effllm_no_stream="true"
    )
    opened = config_from_options(ns, "grpc://h:1, h:2", users=1)
    assert opened.workload.mode == "open" and opened.workload.rate == 2.5
    assert opened.workload.adapters.names == ("a", "b") and opened.workload.adapters.kind == "zipf"
    assert opened.targets == ("h:1", "h:2") and not opened.stream


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--effllm-rate"):
        config_from_options(argparse.Namespace(effllm_rate="fast"), "h:1", 1)
    with pytest.raises(ValueError, match="--host"):
        targets_from_host("")


def test_tokens_count_when_they_stream_not_at_completion() -> None:
    # one request: first token at 0.5 s, then one token a second; it ends at 3.5 s
    row = {"status": "OK", "t_start": 100.0, "t_end": 103.5, "ttft_s": 0.5, "itl_s": [1.0, 1.0, 1.0]}
    row["output_tokens"] = 4
    assert token_times(row) == [100.5, 101.5, 102.5, 103.5]
    series = throughput_series([row])
    assert [b["tokens"] for b in series] == [1.0, 1.0, 1.0, 1.0]
    assert [b["finished"] for b in series] == [0.0, 0.0, 0.0, 1.0]
    unary = {"status": "OK", "t_start": 100.0, "t_end": 101.2, "output_tokens": 3, "ttft_s": None}
    assert token_times(unary) == [101.2] * 3
