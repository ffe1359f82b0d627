"""OpenAI response objects (completions and chat, whole and as stream chunks), usage and logprobs shapes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from semipd_runtime import CompletionOutput, TokenLogprob
from semipd_server.engine_protocol import ServedTokenizer


def _byte_level_table() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character a byte-level BPE vocab uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenStrings:
    """Token id -> (text, raw UTF-8 bytes) for logprobs. A byte-level BPE token can hold part of a character;
    its bytes are exact while its text shows the replacement character, as OpenAI does."""

    def __init__(self, tokenizer: ServedTokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _decoder_kinds(tokenizer) & {"ByteLevel"} != set()
        self._table = _byte_level_table()
        self.text = lru_cache(maxsize=65536)(self._text)
        self.raw = lru_cache(maxsize=65536)(self._raw)

    def _text(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def _raw(self, token_id: int) -> list[int]:
        piece = self._tokenizer.id_to_token(token_id)
        if piece:
            if self._byte_level and all(ch in self._table for ch in piece):
                return [self._table[ch] for ch in piece]
            if (m := _BYTE_FALLBACK.match(piece)) is not None:  # sentencepiece byte fallback
                return [int(m.group(1), 16)]
        return list(self.text(token_id).encode("utf-8"))


def _decoder_kinds(tokenizer: ServedTokenizer) -> set[str]:
    """Decoder types of a `tokenizers` backend (e.g. {"ByteLevel"}), empty when unknown (the tests' fake has
    no backend)."""
    backend = getattr(tokenizer, "backend", None)
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - not a `tokenizers` backend
        return set()
    return {decoder.get("type", "")} | {d.get("type", "") for d in decoder.get("decoders") or []}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(lps: Sequence[TokenLogprob], strings: TokenStrings, offset: int) -> dict[str, Any]:
    """Legacy completions shape: tokens / token_logprobs / top_logprobs (dict per token) / text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        text = strings.text(lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({strings.text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: Sequence[TokenLogprob], strings: TokenStrings) -> dict[str, Any]:
    """Chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": strings.text(token_id), "logprob": logprob, "bytes": strings.raw(token_id)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
        ]
    }


class ResponseBuilder:
    """Common fields of one response: id, created, model, and the choice index of (prompt i, completion j)."""

    def __init__(self, response_id: str, model: str, n: int, strings: TokenStrings) -> None:
        self.id = response_id
        self.model = model
        self.n = n
        self.created = int(time.time())
        self.strings = strings

    def index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    # --- /v1/completions --------------------------------------------------------------------------------------
    def completion_choice(
        self, prompt_index: int, c: CompletionOutput, prefix: str, want_logprobs: bool, text_offset: int = 0
    ) -> dict[str, Any]:
        return {
            "index": self.index(prompt_index, c),
            "text": prefix + c.text,
            "logprobs": completion_logprobs(c.logprobs or [], self.strings, text_offset + len(prefix))
            if want_logprobs
            else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    def completion_chunk(
        self,
        prompt_index: int,
        c: CompletionOutput,
        text: str,
        want_logprobs: bool,
        text_offset: int,
        finish_reason: str | None,
        usage_field: dict[str, Any],
    ) -> dict[str, Any]:
        """`usage_field`: {} (no usage key), {"usage": None} or {"usage": {...so far}} (stream_options)."""
        choice = {
            "index": self.index(prompt_index, c),
            "text": text,
            "logprobs": completion_logprobs(c.delta_logprobs or [], self.strings, text_offset)
            if want_logprobs
            else None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = c.stop_reason
        return self.envelope("text_completion", [choice], **usage_field)

    # --- /v1/chat/completions ---------------------------------------------------------------------------------
    def chat_choice(self, prompt_index: int, c: CompletionOutput, want_logprobs: bool) -> dict[str, Any]:
        return {
            "index": self.index(prompt_index, c),
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.logprobs or [], self.strings) if want_logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    def chat_chunk(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: Sequence[TokenLogprob] | None,
        finish_reason: str | None,
        usage_field: dict[str, Any],
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": chat_logprobs(logprobs, self.strings) if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self.envelope("chat.completion.chunk", [choice], **usage_field)

    def usage_chunk(self, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self.envelope(obj, [], usage=usage(prompt_tokens, completion_tokens))
