"""A small stand-in for semipd_runtime.Engine, for unit tests of the HTTP layer only (the shipped path and the
end-to-end tests use the real Engine). Characters are tokens (id = code point); completion j of a request emits
the prompt's characters reversed, shifted by j, one token per step; so every output is predictable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from semipd_runtime import CompletionOutput, EngineStats, RequestOutput, SamplingParams, TokenLogprob
from semipd_runtime.config import EngineConfig
from semipd_runtime.errors import EngineDeadError, InvalidRequestError, QueueFullError
from semipd_runtime.grammar import StructuredOutput, grammar_text


class CharTokenizer:
    def __init__(self) -> None:
        self.eos_token_ids = [0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def id_to_token(self, token_id: int) -> str | None:
        return chr(token_id)

    supports_tools = True  # tool definitions render as <tools>...</tools> before the conversation

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        if messages[0]["role"] == "assistant":
            raise ValueError("conversation must not start with the assistant")
        tools = template_kwargs.pop("tools", None)
        # a template variable shows up in front, so a test sees it reached the template
        text = "".join(f"<{k}={v}>" for k, v in sorted(template_kwargs.items()))
        text += "".join(f"<{m['role']}>{m['content']}" for m in messages)
        if tools is not None:
            text = f"<tools>{json.dumps(tools)}</tools>" + text
        return text + ("<assistant>" if add_generation_prompt else "")


def expected_tokens(prompt_ids: list[int], index: int, max_tokens: int) -> list[int]:
    rev = prompt_ids[::-1]
    return [rev[k % len(rev)] + index for k in range(max_tokens)]


def logprob_of(step: int) -> float:
    return -0.25 * (step + 1)


class FakeEngine:
    model_name = "fake-model"
    model_path = "/models/fake-model"
    mode = "unified"

    def __init__(self, max_model_len: int = 64, max_active: int = 8, step_s: float = 0.001) -> None:
        self.tokenizer = CharTokenizer()
        self.max_model_len = max_model_len
        self.max_active = max_active
        self.step_s = step_s
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.dead = False
        self.max_running_requests, self.max_queued_requests = max_active, None  # admission limits (Engine's)
        self.pages_total = 100
        self.config = EngineConfig()
        self.gate: asyncio.Event | None = None  # when set by a test, streams wait on it before each token

    async def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
        bootstrap: tuple[str, int | None, int | str] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        params.validate()
        if self.dead:
            raise EngineDeadError("engine core process died")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)}) + max_tokens exceeds {self.max_model_len}", param="prompt"
            )
        if len(self.active) >= self.max_active:
            raise QueueFullError("too many requests queued")
        rid = request_id or f"fake-{id(params)}"
        self.active.add(rid)
        outs = [
            CompletionOutput(j, "", [], None, [] if params.logprobs is not None else None)
            for j in range(params.n)
        ]
        try:
            want = [expected_tokens(ids, j, params.max_tokens) for j in range(params.n)]
            for step in range(params.max_tokens):
                if self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(self.step_s)
                if self.dead:
                    raise EngineDeadError("engine core process died")
                if rid in self.aborted:
                    for c in outs:
                        c.delta_text, c.delta_token_ids, c.delta_logprobs = "", [], []
                        c.finish_reason = c.finish_reason or "abort"
                    yield RequestOutput(rid, ids, outs, True)
                    return
                for j, c in enumerate(outs):
                    if c.finish_reason is not None:
                        c.delta_text, c.delta_token_ids, c.delta_logprobs = "", [], None
                        continue
                    tok = want[j][step]
                    c.token_ids = c.token_ids + [tok]
                    c.delta_token_ids = [tok]
                    text = c.text + chr(tok)
                    lp = None
                    if params.logprobs is not None:
                        top = [(tok, logprob_of(step)), (tok + 1, logprob_of(step) - 1.0)][: params.logprobs]
                        lp = [TokenLogprob(tok, logprob_of(step), top)]
                        c.logprobs = (c.logprobs or []) + lp
                    c.delta_logprobs = lp
                    hit = next((s for s in params.stop_list if s in text), None)
                    if hit is not None:
                        text = text[: text.index(hit)]
                        c.finish_reason, c.stop_reason = "stop", hit
                    elif step + 1 == params.max_tokens:
                        c.finish_reason = "length"
                    c.delta_text, c.text = text[len(c.text) :], text
                done = all(c.finish_reason is not None for c in outs)
                if done:  # recorded first: a consumer stops iterating at the finished output
                    self.finished.append(rid)
                yield RequestOutput(rid, ids, [_copy(c) for c in outs], done)
                if done:
                    return
        finally:
            self.active.discard(rid)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def compile_grammar(self, spec: StructuredOutput) -> str:
        """The grammar text, without the tokenizer check (the real engine's is tested end to end)."""
        return grammar_text(spec)

    @property
    def is_alive(self) -> bool:
        return not self.dead

    def shutdown(self) -> None:
        self.dead = True

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("engine core process died")

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.active), pages_used=2 * len(self.active),
                           pages_total=self.pages_total, healthy=not self.dead)

    def reject_room(self, bootstrap: tuple[str, int | None, int | str], n: int, error: str) -> None:
        pass  # not a PD instance

    def refresh_stats(self, timeout_s: float = 5.0, flush_cache: bool = False) -> EngineStats:
        if self.dead:
            raise EngineDeadError("engine core process died")
        return self.stats()


def _copy(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(
        c.index,
        c.text,
        list(c.token_ids),
        c.finish_reason,
        list(c.logprobs) if c.logprobs is not None else None,
        c.delta_text,
        list(c.delta_token_ids),
        list(c.delta_logprobs) if c.delta_logprobs is not None else None,
        c.stop_reason,
    )
