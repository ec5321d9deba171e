"""The tuner's bounds on one job (TunerLimits.check_job): each field past its bound is refused naming the
field; the data a job generates is bounded by memory (n_train x max_length against a budget), and the
refusal says the rule."""

from __future__ import annotations

import pytest

from effllm.tuner.config import ConfigError, TuneConfig
from effllm.tuner.limits import RECORD_BYTES, TOKEN_BYTES, TunerLimits

BIG = 2_147_483_647  # what the outside test sent


FIELDS = ["n_train", "n_eval", "max_steps", "warmup_steps", "epochs", "batch_size", "grad_accum", "rank"]


@pytest.mark.parametrize("field", [*FIELDS, "eval_max_new_tokens", "pack_length"])
def test_each_field_past_its_bound_is_refused_naming_it(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: {BIG} is over this tuner's limit \d+"):
        TunerLimits(memory_budget_mb=1 << 20).check_job(TuneConfig(**{field: BIG}))


def test_defaults_and_sizes_under_the_bounds_pass() -> None:
    limits = TunerLimits(memory_budget_mb=1024)
    limits.check_job(TuneConfig())
    limits.check_job(TuneConfig(n_train=50_000, max_length=128, batch_size=64, rank=64, max_steps=5000))


def test_lengths_and_batch_tokens_are_bounded() -> None:
    limits = TunerLimits(memory_budget_mb=1 << 20, max_length=1024, max_batch_tokens=4096, max_steps=100_000)
    with pytest.raises(ConfigError, match=r"^max_length: 2048 is over this tuner's limit 1024"):
        limits.check_job(TuneConfig(max_length=2048))
    with pytest.raises(ConfigError, match=r"^batch_size: 64 rows x 128 tokens is over .* 4096 tokens"):
        limits.check_job(TuneConfig(batch_size=64, max_length=128))
    with pytest.raises(ConfigError, match=r"^batch_size: 8 rows x 1024 tokens"):  # packing: the row is 2x
        limits.check_job(TuneConfig(batch_size=8, max_length=512, packing=True))
    with pytest.raises(
        ConfigError, match=r"^epochs: 100 epochs of n_train 80000 at 8 examples a step are 1000000"
    ):
        limits.check_job(TuneConfig(n_train=80_000, epochs=100, max_length=64))
    limits.check_job(TuneConfig(n_train=80_000, epochs=100, max_steps=1000, max_length=64))  # max_steps rules
    with pytest.raises(ConfigError, match=r"^target_modules: more than 4 items"):
        TunerLimits(max_list_items=4).check_job(TuneConfig(target_modules=tuple("abcde")))


def test_data_is_bounded_by_a_memory_budget_and_the_refusal_says_the_rule() -> None:
    limits = TunerLimits(memory_budget_mb=64, max_n_train=10**9)
    per_example = RECORD_BYTES + TOKEN_BYTES * 128
    fits = (64 << 20) // per_example - 64  # with the default n_eval 64
    limits.check_job(TuneConfig(n_train=fits, max_length=128))
    with pytest.raises(ConfigError) as err:
        limits.check_job(TuneConfig(n_train=fits + 1, max_length=128))
    assert str(err.value).startswith(
        f"n_train: (n_train {fits + 1} + n_eval 64) x (2048 B + 80 B x max_length 128)"
    )
    assert "over this tuner's budget of 64 MiB (--memory-budget-mb 64)" in str(err.value)
    # a shorter max_length leaves room for more examples
    limits.check_job(TuneConfig(n_train=fits + 1, max_length=64))


def test_without_a_budget_half_the_available_memory_is_the_budget() -> None:
    import psutil

    budget, source = TunerLimits().data_budget_bytes()
    assert source == "half the memory available now"
    assert 0 < budget <= psutil.virtual_memory().total // 2
    with pytest.raises(ConfigError, match=r"^n_train: .*\(half the memory available now\)"):
        TunerLimits(max_n_train=BIG).check_job(TuneConfig(n_train=BIG - 64))


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_jobs", 0), ("max_running", -1), ("cancel_grace_s", 0.0), ("cancel_grace_s", 61.0)],
)
def test_bad_limits_are_refused_naming_the_flag(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^--{field.replace('_', '-')}: "):
        TunerLimits(**{field: value})
