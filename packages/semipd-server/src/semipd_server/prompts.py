"""Request preparation off the event loop: parsing a body, rendering a chat template, tokenizing and decoding
prompts run in a small thread pool, so a multi-megabyte request never stalls `/health` or the streams of others
(the `tokenizers` encode/decode release the GIL; Python-level parsing yields it every switch interval).

Before tokenizing, a prompt's length in characters is checked against what the context could ever hold, so an
absurdly long prompt is refused at once instead of after seconds of tokenization."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from semipd_server.errors import ApiError

T = TypeVar("T")
Prompt = str | list[int]

# A normalizer can shrink text before it is split into tokens (NFC composes up to 4 code points into one, e.g.
# Greek with two accents and iota subscript), so the character bound allows for it.
_NORMALIZER_SHRINK = 4
INLINE_BYTES = 16 << 10  # bodies up to this size are prepared on the event loop: ~1 ms of tokenizing at most


def max_token_chars(tokenizer: Any) -> int | None:
    """Most characters one token can stand for: the longest vocabulary entry (byte-level and sentencepiece
    entries have at least one character per character they decode to) plus one for a decoder's added space.
    None when the tokenizer does not expose its vocabulary (then only the token count is checked)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    return max(len(t) for t in backend.get_vocab(with_added_tokens=True)) + 1


def _context_error(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="context_length_exceeded")


class PromptPrep:
    def __init__(self, tokenizer: Any, max_model_len: int, workers: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        per_token = max_token_chars(tokenizer)
        self.max_chars = None if per_token is None else max_model_len * per_token * _NORMALIZER_SHRINK
        # leave a core to the event loop and the engine core: tokenizing is what a flood of huge prompts costs
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = workers or max(1, min(4, cpus - 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="semipd-prep")

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` for a body of `size` bytes: inline when small (a millisecond at most, and never queued
        behind a huge one), else on the preparation pool. Its exceptions (ApiError included) are raised here."""
        if size <= INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def check_chars(self, n_chars: int, param: str) -> None:
        if self.max_chars is not None and n_chars > self.max_chars:
            raise _context_error(
                f"prompt has {n_chars} characters, more than this model's context of {self.max_model_len} tokens "
                f"could hold (at most {self.max_chars} characters); shorten it",
                param,
            )

    def check_tokens(self, n_tokens: int, param: str) -> None:
        if n_tokens >= self.max_model_len:
            raise _context_error(
                f"prompt has {n_tokens} tokens; this model's context is {self.max_model_len} tokens", param
            )

    def prompt_ids(self, prompt: Prompt, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text or token prompt, refused (400) when it cannot fit the context. Blocking."""
        if isinstance(prompt, str):
            self.check_chars(len(prompt), param)
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = prompt
        self.check_tokens(len(ids), param)
        return ids

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the preparation pool whatever the body's size (a grammar compile, however small the
        schema that asks for it, may take a while)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def chat_ids(self, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Render the chat template (with the request's `template_kwargs`: add_generation_prompt, tools and the
        variables of chat_template_kwargs) and tokenize it; a template's own error is the client's to fix.
        Blocking."""
        text = self.render_chat(messages, template_kwargs)
        # the template already wrote any BOS; adding special tokens again would double it
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self.check_tokens(len(ids), "messages")
        return ids

    def render_chat(self, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat template's prompt text, refused (400) when the template fails or it cannot fit. Blocking."""
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        kwargs = template_kwargs or {"add_generation_prompt": True}
        try:
            text = str(self.tokenizer.apply_chat_template(messages, **kwargs))
        except Exception as e:  # noqa: BLE001 - e.g. a role order the template refuses
            raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        self.check_chars(len(text), "messages")
        return text

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
