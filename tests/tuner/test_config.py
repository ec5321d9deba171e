"""TuneConfig: every field validated with its name in the message; YAML and flags map onto it."""

from __future__ import annotations

from pathlib import Path

import pytest

from effllm.cli.main import build_parser
from effllm.tuner.cli import config_from_args
from effllm.tuner.config import ConfigError, TuneConfig


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"method": "qlora"}, "method"),
        ({"rank": 0}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.5}, "dropout"),
        ({"schedule": "step"}, "schedule"),
        ({"precision": "fp16"}, "precision"),
        ({"lr": 0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 4}, "max_length"),
        ({"target_modules": ()}, "target_modules"),
        ({"layers": ()}, "layers"),
        ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
    ],
)
def test_invalid_values_name_their_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        TuneConfig(**changes)  # type: ignore[arg-type]


def test_from_dict_rejects_unknown_keys_and_bad_types() -> None:
    with pytest.raises(ConfigError, match=r"^rnak: unknown setting"):
        TuneConfig.from_dict({"rnak": 8})
    with pytest.raises(ConfigError, match=r"^rank: 'eight' is not a valid int"):
        TuneConfig.from_dict({"rank": "eight"})
    with pytest.raises(ConfigError, match=r"^rank: 2\.5"):
        TuneConfig.from_dict({"rank": 2.5})


def test_yaml_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "method: dora\nrank: 4\nalpha: 8\ntarget_modules: [q_proj, k_proj]\nlayers: [-1]\nlr: 0.001\n"
    )
    args = build_parser().parse_args(["tune", str(path), "--rank", "16", "--target-modules", "v_proj,o_proj"])
    config = config_from_args(args)
    assert (config.method, config.rank, config.alpha, config.lr) == ("dora", 16, 8.0, 1e-3)
    assert config.target_modules == ("v_proj", "o_proj")
    assert config.layers == (-1,)
    assert config.served_method == "dora"
    assert TuneConfig(method="lora_plus").served_method == "lora"


def test_yaml_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TuneConfig.from_yaml(path)
    path.write_text("method: lora\nbatch-size: -3\n")
    with pytest.raises(ConfigError, match=r"^batch_size: -3 must be >= 1"):
        TuneConfig.from_yaml(path)


def test_round_trip_through_dict() -> None:
    config = TuneConfig(method="freeze", layers=(0, -1), target_modules=("q_proj",), eval_before=False)
    assert TuneConfig.from_dict(config.to_dict()) == config
