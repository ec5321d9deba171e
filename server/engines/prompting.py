"""Turn a request's prompt or chat turns into token ids, and check they fit the context.

Both engines tokenize here, so a prompt means the same tokens whichever engine serves it. The runner calls
`Engine.prepare` (here: `prepare`) before admission, so an over-long or unrenderable prompt is refused before
the request takes a slot; `generate` then reuses the prepared ids.
Invariant: every id list an engine decodes from went through `render`'s checks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .base import EffllmError, GenerationRequest


class PromptRenderer:
    def __init__(self, tokenizer: Any, max_context: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its checked prompt ids; raises EffllmError naming the field."""
        return replace(request, prompt_ids=tuple(self.render(request)))

    def ids(self, request: GenerationRequest) -> list[int]:
        """The prompt ids to decode from: the prepared ones, or rendered now (engine used directly)."""
        return list(request.prompt_ids) if request.prompt_ids is not None else self.render(request)

    def render(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise EffllmError(
                    "failed_precondition", "messages: this model has no chat template; send a prompt"
                )
            turns = [{"role": t.role, "content": t.content} for t in request.messages]
            ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            token_ids = list(ids)
        else:
            token_ids = self.tokenizer.encode(request.prompt or "", add_special_tokens=True)
        if not token_ids:
            raise EffllmError("invalid_argument", "prompt: renders to zero tokens")
        if request.max_prompt_tokens and len(token_ids) > request.max_prompt_tokens:
            raise EffllmError(
                "invalid_argument",
                f"prompt: {len(token_ids)} tokens is over this server's limit of "
                f"max_prompt_tokens={request.max_prompt_tokens}",
            )
        budget = self.max_context - request.sampling.max_new_tokens
        if len(token_ids) > budget:
            raise EffllmError(
                "invalid_argument",
                f"prompt: {len(token_ids)} tokens + max_new_tokens {request.sampling.max_new_tokens} "
                f"exceed the context of {self.max_context} tokens",
            )
        return token_ids
