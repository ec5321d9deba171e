"""Every built-in task gives at least 64 held-out prompts that are never trained on; iso_alpha3 is pycountry's
real ISO 3166-1 list with a held-out set that does not move when n_train or n_eval change."""

from __future__ import annotations

import pytest

from effllm.tuner import tasks


def _prompts(records: list[dict[str, object]]) -> list[str]:
    return [r["messages"][0]["content"] for r in records]  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_each_task_holds_out_64_unseen_prompts(name: str) -> None:
    train, held = tasks.generate(name, 256, tasks.EVAL_POOL, seed=0)
    assert len(held) == 64 and len(set(_prompts(held))) == 64
    assert not set(_prompts(held)) & set(_prompts(train))
    assert tasks.generate(name, 256, 64, seed=0) == (train, held)  # deterministic


def test_iso_alpha3_is_the_real_iso_list() -> None:
    import pycountry

    train, held = tasks.generate("iso_alpha3", 1000, 64, seed=0)
    assert len(train) + len(held) == len(pycountry.countries) >= 240
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in train + held}  # type: ignore[index]
    germany = next(p for p in answers if " of Germany?" in p)
    assert answers[germany] == "DEU"
    # n_eval below the pool keeps a prefix of the same held-out set; the train set does not change.
    small_train, small_held = tasks.generate("iso_alpha3", 1000, 16, seed=0)
    assert small_held == held[:16] and small_train == train
    assert tasks.generate("iso_alpha3", 20, 64, seed=0)[0] == train[:20]
    with pytest.raises(ValueError, match="leaves nothing"):
        tasks.generate("iso_alpha3", 10, 1000, seed=0)
