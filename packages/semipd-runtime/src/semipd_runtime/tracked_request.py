"""Front-end state of one request: its n completions' tokens, text (incremental detokenization) and stop strings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from semipd_runtime.errors import EngineDeadError, InvalidRequestError, KvTransferError, SemipdError
from semipd_runtime.messages import TokenEvent
from semipd_runtime.outputs import CompletionOutput, RequestOutput, TokenLogprob
from semipd_runtime.sampling_params import SamplingParams
from semipd_runtime.tokenizer import IncrementalDetokenizer, Tokenizer

_ERRORS: dict[int, type[SemipdError]] = {400: InvalidRequestError, 502: KvTransferError, 503: EngineDeadError}


@dataclass(slots=True)
class _Completion:
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0


class TrackedRequest:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 sink: Callable[[Any], None] | None, eos_token_ids: Iterable[int] = ()) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.streaming = False
        self.core_rids: list[str] = []
        self.error: BaseException | None = None
        self.completions = [
            _Completion(IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens))
            for _ in range(params.n)
        ]
        # a stop string may begin up to `_lookback` chars before new text; unless it is kept in the output,
        # that much text is held back from a stream until it is known not to start one
        self._lookback = max((len(s) for s in params.stop_list), default=1) - 1
        self._hold = 0 if params.include_stop_str_in_output else self._lookback
        # vLLM's convention: stop_reason is the token id only for a stop_token_ids match; EOS (which wins when a
        # token is both, unless ignore_eos) and the length limit leave it None
        eos = set() if params.ignore_eos else set(eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids or ()) - eos
        self._lock = threading.Lock()
        self.metrics: dict[str, float] = {"arrival": time.monotonic()}

    @property
    def finished(self) -> bool:
        return self.error is not None or all(c.finish_reason is not None for c in self.completions)

    def on_event(self, idx: int, ev: TokenEvent) -> bool:
        """Apply one core event; returns True when a stop string ended the completion here."""
        c = self.completions[idx]
        with self._lock:
            if c.finish_reason is not None:
                return False
            if ev.token_ids and "first_token" not in self.metrics:
                self.metrics["first_token"] = time.monotonic()
            # the error before any finish_reason: a reader polling `finished` from another thread must see it
            if ev.error is not None and self.error is None and ev.status in _ERRORS:
                # rejected by the core (400), its worker died (503), the KV never came from the prefill instance
                # (502); a timeout (504) just ends with "abort"
                self.error = _ERRORS[ev.status](ev.error)
            c.token_ids += ev.token_ids
            if ev.logprobs:
                c.logprobs += [TokenLogprob(m.token_id, m.logprob, [(tid, lp) for tid, lp in m.top])
                               for m in ev.logprobs]
            start = max(0, len(c.text) - self._lookback)
            c.text += c.detok.add(ev.token_ids)
            # min_tokens: no stop string ends it before then (the core bans EOS and stop ids until then)
            stop_hit = len(c.token_ids) >= self.params.min_tokens and self._apply_stop_strings(c, start)
            if not stop_hit and ev.finish_reason is not None:
                c.finish_reason = ev.finish_reason
                if ev.finish_reason == "stop" and ev.token_ids and ev.token_ids[-1] in self._stop_ids:
                    c.stop_reason = ev.token_ids[-1]
            if c.finish_reason is not None and self.finished:
                self.metrics["finished"] = time.monotonic()
            return stop_hit

    def _apply_stop_strings(self, c: _Completion, start: int) -> bool:
        best: tuple[int, str] | None = None
        for s in self.params.stop_list:
            pos = c.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return False
        c.text = c.text[: best[0] + (len(best[1]) if self.params.include_stop_str_in_output else 0)]
        c.finish_reason, c.stop_reason = "stop", best[1]
        return True

    def fail(self, error: BaseException) -> None:
        self.error = error
        for c in self.completions:
            if c.finish_reason is None:
                c.finish_reason = "abort"
        if self.sink is not None:
            self.sink(error if self.streaming else None)

    def publish(self) -> None:
        """Hand the sink what changed: a delta snapshot when streaming, a wake-up when the request is done."""
        if self.sink is None:
            return
        if self.streaming:  # a rejection or a dead worker ends the stream with its error (-> HTTP 400 / 503)
            self.sink(self.error if self.error is not None else self.snapshot())
        elif self.finished:
            self.sink(None)

    def snapshot(self, final: bool = False) -> RequestOutput:
        outs: list[CompletionOutput] = []
        with self._lock:
            for i, c in enumerate(self.completions):
                done = c.finish_reason is not None
                visible = len(c.text) if done else max(c.sent_text, len(c.text) - self._hold)
                want_lp = self.params.logprobs is not None
                outs.append(CompletionOutput(
                    index=i, text=c.text[:visible], token_ids=list(c.token_ids), finish_reason=c.finish_reason,
                    logprobs=list(c.logprobs) if want_lp else None,
                    delta_text=c.text[c.sent_text:visible], delta_token_ids=c.token_ids[c.sent_tokens:],
                    delta_logprobs=c.logprobs[c.sent_logprobs:] if want_lp else None,
                    stop_reason=c.stop_reason))
                if not final:
                    c.sent_text, c.sent_tokens, c.sent_logprobs = visible, len(c.token_ids), len(c.logprobs)
            return RequestOutput(self.request_id, self.prompt_ids, outs, self.finished, dict(self.metrics))
