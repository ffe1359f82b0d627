"""Per-request sampling parameters, validated once at the edge so the engine never sees bad values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.grammar import StructuredOutput


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # number of top logprobs per token; 0 = only the sampled token's
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # the output must match this grammar (`grammar.py`)
    # OpenAI / vLLM semantics (`penalties.py`): presence and frequency count output tokens, repetition also
    # the prompt's; min_tokens bans EOS and stop_token_ids (and ignores stop strings) until that many are out
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif self.stop is not None:
            self.stop_list = list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field."""

        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {why}", param=param)

        def number(param: str, v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(param, f"must be a finite number, got {v!r}")
            return float(v)

        def integer(param: str, v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(param, f"must be an integer, got {v!r}")
            return v

        if number("temperature", self.temperature) < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < number("top_p", self.top_p) <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if integer("top_k", self.top_k) < -1 or self.top_k == 0:
            raise bad("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= number("min_p", self.min_p) <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (integer("seed", self.seed) < 0 or self.seed >= 2**63):
            raise bad("seed", f"must be in [0, 2**63), got {self.seed}")
        if integer("max_tokens", self.max_tokens) < 1:
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 1 <= integer("n", self.n) <= 128:
            raise bad("n", f"must be in [1, 128], got {self.n}")
        if self.logprobs is not None and not 0 <= integer("logprobs", self.logprobs) <= 20:
            raise bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        for s in self.stop_list:
            if not isinstance(s, str) or not s:
                raise bad("stop", f"entries must be non-empty strings, got {s!r}")
        if len(self.stop_list) > 16:
            raise bad("stop", "accepts at most 16 strings")
        for t in self.stop_token_ids or []:
            if integer("stop_token_ids", t) < 0 or (vocab_size is not None and t >= vocab_size):
                raise bad("stop_token_ids", f"entry {t} is outside the vocabulary")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name, getattr(self, name)) <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if integer("min_tokens", self.min_tokens) < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logit_bias is not None:
            self._validate_logit_bias(vocab_size)

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict):
            raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {bias!r}", param="logit_bias")
        for t, v in bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise InvalidRequestError(f"logit_bias key {t!r} is not a token id of the vocabulary"
                                          + (f" (size {vocab_size})" if vocab_size else ""), param="logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
                raise InvalidRequestError(f"logit_bias value for token {t} must be a number in [-100, 100], "
                                          f"got {v!r}", param="logit_bias")
