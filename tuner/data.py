"""Load training data (JSONL, a built-in task, a `datasets` name), validate it, tokenize it with loss masks.

Record forms, one JSON object per line:
  {"text": "..."}                                     loss on every token
  {"prompt": "...", "response": "..."}                raw completion; loss on the response (+ EOS) only
  {"messages": [{"role": "...", "content": "..."}]}   chat template applied; loss on assistant turns only
Invariant: every line is validated before anything trains or is written; the first bad line raises DataError
naming the file, the line number and what is wrong. Prompt tokens are exactly what a server would feed the
model for the same prompt (the chat template with add_generation_prompt, tokenized as a whole).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tasks
from .events import Cancelled

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
_ROLES = ("system", "user", "assistant")
Record = dict[str, Any]


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Dataset:
    name: str
    sha256: str  # of the train + eval records as canonical JSON: the manifest records what was trained on
    train: list[Record]
    eval: list[Record]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def validate_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    forms = [k for k in ("text", "prompt", "messages") if k in obj]
    if len(forms) != 1:
        raise DataError(
            f"{where}: needs exactly one of 'text', 'prompt'+'response' or 'messages' "
            f"(found keys: {', '.join(sorted(obj)) or 'none'})"
        )
    form = forms[0]
    if form == "text":
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return {"text": obj["text"]}
    if form == "prompt":
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (prompt/response records need both)")
        if not obj["response"]:
            raise DataError(f"{where}: 'response' is empty: nothing to learn")
        return {"prompt": obj["prompt"], "response": obj["response"]}
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise DataError(f"{where}: messages[{i}].role {m['role']!r} is not one of {', '.join(_ROLES)}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is what the model learns)")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def read_jsonl(path: Path) -> list[Record]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            records.append(validate_record(obj, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_dataset(
    spec: str,
    *,
    eval_data: str = "",
    eval_fraction: float = 0.1,
    n_train: int = 0,
    n_eval: int = 32,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Dataset:
    """`spec`: "task:NAME", "hf:ID[:SPLIT]" or a JSONL path; `eval_data`: "hf:ID[:SPLIT]" or a JSONL path."""
    if spec.startswith("task:"):
        train, held = tasks.generate(spec[5:], n_train or 256, n_eval, seed, should_stop)
    else:
        records = _load(spec)
        if eval_data:
            train, held = records, _load(eval_data)
        else:
            # A deterministic hold-out: every k-th record, so the split does not depend on file order tricks.
            k = max(2, round(1 / eval_fraction)) if eval_fraction > 0 else 0
            held = [r for i, r in enumerate(records) if k and i % k == k - 1]
            train = [r for i, r in enumerate(records) if not (k and i % k == k - 1)]
        if n_train:
            train = train[:n_train]
        held = held[:n_eval]
        if not train:
            raise DataError(f"data {spec}: no training records left after holding out the eval split")
    digest = hashlib.sha256()
    for r in (*train, {"split": "eval"}, *held):
        digest.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return Dataset(spec, digest.hexdigest(), train, held)


def _load(spec: str) -> list[Record]:
    return _load_hf(spec[3:]) if spec.startswith("hf:") else read_jsonl(Path(spec))


def _load_hf(name: str) -> list[Record]:
    """A hub dataset (TuneConfig checked `name` is a hub id, not a path). NOTE: `datasets.load_dataset`
    takes a local folder, or a packaged builder ("json", "csv"...) that globs the current folder, before the
    hub; it runs from an empty temporary folder, so a hub id never reads a file of ours."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"data hf:{name}: the `datasets` package is not installed (pip install datasets)"
        ) from exc
    repo, _, split = name.partition(":")
    here = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="effllm-hf-") as empty:
            os.chdir(empty)  # contextlib.chdir is 3.11+; the package runs on 3.10
            try:
                rows: Iterable[Any] = list(datasets.load_dataset(repo, split=split or "train"))
            finally:
                os.chdir(here)
    except Exception as exc:  # no internet, unknown name, ...
        raise DataError(f"data hf:{name}: could not load ({exc})") from exc
    return [validate_record(dict(row), f"hf:{name}[{i}]") for i, row in enumerate(rows)]


class Encoder:
    """Records -> token ids + labels with the loss mask, for one tokenizer and max length."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def chat_prompt_ids(self, messages: Sequence[Record]) -> list[int]:
        ids = self.tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def prompt_and_reference(self, record: Record) -> tuple[list[int], str] | None:
        """What generation starts from and the answer it should produce; None for text records."""
        if "messages" in record:
            return self.chat_prompt_ids(record["messages"][:-1]), record["messages"][-1]["content"]
        if "prompt" in record:
            return self._ids(record["prompt"], special=True), record["response"]
        return None

    def encode(self, record: Record) -> Encoded:
        segments: list[tuple[list[int], bool]]  # (ids, carries loss)
        if "text" in record:
            segments = [([*self._ids(record["text"], special=True), self.eos], True)]
        elif "prompt" in record:
            segments = [
                (self._ids(record["prompt"], special=True), False),
                ([*self._ids(record["response"]), self.eos], True),
            ]
        else:
            segments = self._chat_segments(record["messages"])
        ids: list[int] = []
        labels: list[int] = []
        for seg, train in segments:
            ids += seg
            labels += seg if train else [IGNORE] * len(seg)
        return Encoded(ids[: self.max_length], labels[: self.max_length])

    def _chat_segments(self, messages: list[Record]) -> list[tuple[list[int], bool]]:
        # Render the conversation turn by turn: the text up to each assistant turn (with the generation
        # prompt) is the context, the assistant's rendered turn (content + end-of-turn tokens) carries loss.
        segments: list[tuple[list[int], bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            context = self.tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            full = self.tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not context.startswith(done) or not full.startswith(context):
                raise DataError("messages: this chat template does not render turns as prefixes; cannot mask")
            segments.append((self._ids(context[len(done) :]), False))
            segments.append((self._ids(full[len(context) :]), True))
            done = full
        return segments


def encode_all(
    encoder: Encoder, records: Sequence[Record], what: str, should_stop: Callable[[], bool] | None = None
) -> list[Encoded]:
    out = []
    for i, r in enumerate(records):
        if i % 256 == 0 and should_stop is not None and should_stop():  # a tokenizer call is ~0.1-1 ms
            raise Cancelled()
        out.append(encoder.encode(r))
    kept = [e for e in out if e.n_target > 0]
    if not kept:
        raise DataError(f"{what}: no example has a response token within max_length {encoder.max_length}")
    return kept
