"""`effllm serve` flags: the request limits' defaults are Limits' own (one source of truth), and a
ServerConfig built from default flags carries exactly `Limits()`."""

from __future__ import annotations

import dataclasses

from effllm.cli.main import build_parser
from effllm.server.service import Limits

FLAG_OF = {
    "max_new_tokens": "max_new_tokens",
    "max_prompt_chars": "max_prompt_chars",
    "max_prompt_tokens": "max_prompt_tokens",
    "max_request_s": "max_request_seconds",
}


def test_limit_flags_default_to_the_limits_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    defaults = Limits()
    for field, flag in FLAG_OF.items():
        assert getattr(args, flag) == getattr(defaults, field), field
    # every Limits field a flag sets is covered above; the others have no flag
    flagged = {f.name for f in dataclasses.fields(Limits) if hasattr(args, f.name) or f.name in FLAG_OF}
    assert flagged == {*FLAG_OF, "default_max_new_tokens"}


def test_default_max_new_tokens_is_the_models_then_limits() -> None:
    """Unset, the flag defers to the model's generation_config.json, and without one to Limits' default."""
    from effllm.server.cli import DEFAULT_MAX_NEW_TOKENS

    assert build_parser().parse_args(["serve"]).default_max_new_tokens is None
    assert Limits().default_max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_explicit_flag_still_wins() -> None:
    args = build_parser().parse_args(["serve", "--max-new-tokens", "7"])
    assert args.max_new_tokens == 7
