"""TextStream on the real tokenizer: deltas add up, never split a character, and cut at stop strings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from effllm.common.model import resolve_model
from effllm.server.engines.hf_text import TextStream

pytestmark = pytest.mark.model  # loads the real model (deselected by scripts/test.sh --fast)

TEXT = "Café ☕ costs 3€ — 日本語のテキスト 🚀🎉 done."


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(resolve_model(None).path)


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for t in ids:
        deltas.append(stream.add(t))
        if stream.stopped:
            break
    if not stream.stopped:
        deltas.append(stream.flush())
    return deltas


def test_multibyte_tokens_stream_whole_characters(tok) -> None:  # type: ignore[no-untyped-def]
    prompt = tok.encode("Say:")
    ids = tok.encode(TEXT, add_special_tokens=False)
    # byte-level BPE splits the emoji and CJK characters over several tokens: the case this is about
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    deltas = feed(TextStream(tok, prompt, ()), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == TEXT


def test_stop_string_is_cut_and_never_leaked(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tok, [], ("日本語", "zzz"))
    deltas = feed(stream, ids)
    assert stream.stopped
    assert "".join(deltas) == TEXT[: TEXT.index("日本語")]


def test_partial_stop_prefix_is_held_back_then_released(tok) -> None:  # type: ignore[no-untyped-def]
    stream = TextStream(tok, [], (" costs 4",))
    first = "".join(stream.add(t) for t in tok.encode("Price costs", add_special_tokens=False))
    assert first == "Price"  # " costs" may be the start of the stop string: held back
    rest = "".join(stream.add(t) for t in tok.encode(" 3 today", add_special_tokens=False)) + stream.flush()
    assert rest == " costs 3 today" and not stream.stopped
