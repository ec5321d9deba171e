"""Workload generators: seeded, and distributed as documented (rates, burstiness, Zipf, lengths, shapes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from effllm.loadtest.workload import (
    AdapterMix,
    Arrivals,
    LengthDist,
    PromptSource,
    Shape,
    Workload,
)


def test_poisson_mean_rate_and_cv() -> None:
    gaps = Arrivals("poisson").gaps(np.random.default_rng(1), rate=4.0, n=20_000)
    assert abs(1 / gaps.mean() - 4.0) / 4.0 < 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: CV = 1


@pytest.mark.parametrize("b", [0.25, 1.0, 4.0])
def test_gamma_keeps_rate_and_sets_burstiness(b: float) -> None:
    gaps = Arrivals("gamma", b).gaps(np.random.default_rng(2), rate=10.0, n=40_000)
    assert abs(1 / gaps.mean() - 10.0) / 10.0 < 0.03
    assert abs((gaps.std() / gaps.mean()) ** 2 - 1 / b) < 0.08 / b  # CV² = 1/b


def test_zipf_shape_matches_alpha() -> None:
    names = tuple(f"a{i}" for i in range(8))
    mix = AdapterMix("zipf", names, alpha=1.0)
    p = mix.probabilities()
    assert p[0] / p[1] == pytest.approx(2.0) and p[0] / p[7] == pytest.approx(8.0)
    rng = np.random.default_rng(3)
    picks = [mix.pick(rng, i) for i in range(30_000)]
    freq = np.array([picks.count(n) for n in names]) / len(picks)
    assert np.abs(freq - p).max() < 0.01
    # the log-log slope of frequency against rank is -alpha
    slope = np.polyfit(np.log(np.arange(1, 9)), np.log(freq), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.08)


def test_base_share_uniform_and_round_robin() -> None:
    rng = np.random.default_rng(4)
    mix = AdapterMix("uniform", ("x", "y"), base_share=0.3)
    picks = [mix.pick(rng, i) for i in range(20_000)]
    assert picks.count("") / len(picks) == pytest.approx(0.3, abs=0.015)
    assert picks.count("x") / len(picks) == pytest.approx(0.35, abs=0.015)
    rr = AdapterMix("round_robin", ("x", "y", "z"))
    assert [rr.pick(rng, i) for i in range(6)] == ["x", "y", "z", "x", "y", "z"]


def test_model_qualified_adapters_are_drawn_for_their_own_model() -> None:
    """MODEL:NAME adapters belong to that model: a request on it draws among its own, Zipf by their rank
    (a model without any goes to the base); the name sent is bare."""
    names = ("a:a1", "a:a2", "b:b1", "a:a3", "b:b2")
    mix = AdapterMix("zipf", names, alpha=1.0)
    rng = np.random.default_rng(6)
    on_a = [mix.pick(rng, i, "a") for i in range(20_000)]
    assert set(on_a) == {"a1", "a2", "a3"}
    p = np.array([1 / 1, 1 / 2, 1 / 4])  # their ranks among all names: 1, 2 and 4
    freq = np.array([on_a.count(n) for n in ("a1", "a2", "a3")]) / len(on_a)
    assert np.abs(freq - p / p.sum()).max() < 0.015
    assert set(mix.pick(rng, i, "b") for i in range(200)) == {"b1", "b2"}
    assert mix.pick(rng, 0, "c") == ""  # a model with no adapter of its own: the base
    rr = AdapterMix("round_robin", names)
    assert [rr.pick(rng, i, "b") for i in range(4)] == ["b1", "b2", "b1", "b2"]


def test_lengths_parse_and_sample() -> None:
    rng = np.random.default_rng(5)
    assert set(LengthDist.parse("17").sample(rng, 100)) == {17}
    u = LengthDist.parse("uniform:10-20").sample(rng, 5000)
    assert u.min() == 10 and u.max() == 20 and abs(u.mean() - 15) < 0.3
    ln = LengthDist.parse("lognormal:100,0.5").sample(rng, 20000)
    assert abs(ln.mean() - 100) < 3
    with pytest.raises(ValueError, match="uniform"):
        LengthDist.parse("uniform:abc")
    with pytest.raises(ValueError, match="use"):
        LengthDist.parse("weird:1")


def test_shapes() -> None:
    step = Shape("step", 1, 4, duration_s=40, step_s=10)
    assert [step.value(t) for t in (0, 9.9, 10, 25, 39)] == [1, 1, 2, 3, 4]
    assert step.value(40) is None
    ramp = Shape("ramp", 0, 10, duration_s=10)
    assert ramp.value(5) == pytest.approx(5.0)


def test_same_seed_same_stream_and_json_round_trip(tmp_path) -> None:
    w = Workload(
        seed=7,
        rate=3.0,
        prompts=PromptSource("chat", LengthDist.parse("uniform:8-40"), chat_share=0.5),
        output=LengthDist.parse("normal:16,4"),
        adapters=AdapterMix("zipf", ("a", "b", "c"), 1.2, 0.1),
        shape=Shape("ramp", 1, 5, 30),
    )
    w2 = Workload.from_dict(json.loads(json.dumps(w.to_dict())))
    assert w2 == w
    a, b, c = w.requests(0), w2.requests(0), w.requests(1)
    sa = [a.next() for _ in range(50)]
    assert sa == [b.next() for _ in range(50)]
    assert sa != [c.next() for _ in range(50)]  # another process draws another stream
    assert {s.prompt.messages is not None for s in sa} == {True, False}  # a chat mix
    assert [a.gap(2.0) for _ in range(5)] == [b.gap(2.0) for _ in range(5)]


def test_synthetic_prompt_length_in_words_and_jsonl(tmp_path) -> None:
    w = Workload(prompts=PromptSource("synthetic", LengthDist.parse("25")))
    spec = w.requests().next()
    assert spec.prompt.prompt is not None and len(spec.prompt.prompt.split()) == 25
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "hello", "max_new_tokens": 5}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    js = Workload(prompts=PromptSource("jsonl", path=str(f)), output=LengthDist.parse("9")).requests()
    seen = {(s.prompt.prompt, s.max_new_tokens) for s in (js.next() for _ in range(40))}
    assert seen == {("hello", 5), (None, 9)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        Workload(prompts=PromptSource("jsonl", path=str(bad))).requests()


def test_invalid_configs_name_the_field() -> None:
    with pytest.raises(ValueError, match="names"):
        AdapterMix("zipf")
    with pytest.raises(ValueError, match="base_share"):
        AdapterMix("uniform", ("a",), base_share=2)
    with pytest.raises(ValueError, match="burstiness"):
        Arrivals("gamma", 0)
    with pytest.raises(ValueError, match="rate"):
        Workload(rate=0)


def test_ramp_arrivals_follow_the_rate_over_time() -> None:
    """A ramp 0 -> 10 req/s over 40 s: ~200 arrivals, three times as many in the second half."""
    counts = []
    for seed in range(5):
        w = Workload(seed=seed, rate=10.0, shape=Shape("ramp", 0.0, 10.0, duration_s=40.0))
        s, t, times = w.requests(), 0.0, []
        while (t := s.next_arrival(t)) is not None:  # type: ignore[assignment]
            times.append(t)
        counts.append((sum(x < 20 for x in times), sum(x >= 20 for x in times)))
    first, second = (sum(c[i] for c in counts) / 5 for i in (0, 1))
    assert abs(first + second - 200) < 20 and abs(second / first - 3) < 0.6
    # a constant rate keeps the exact gap stream
    w = Workload(seed=1, rate=4.0)
    a, b = w.requests(), w.requests()
    assert a.next_arrival(1.0) == pytest.approx(1.0 + b.gap(4.0))
