"""Structured output through llguidance: a grammar (JSON schema, any JSON object, regex, Lark) per request, one
matcher per completion, and the token bitmask of each step.

- The front end (`GrammarCompiler`, in `Engine`) turns a request's `StructuredOutput` into llguidance's grammar
  text and validates it against the tokenizer, once per distinct spec (cached): a bad schema is the client's
  400 before anything is queued. The server calls it on its preparation pool, off the event loop.
- The core (`GrammarRuntime`) builds a matcher per request from that text (a copy of a cached, already
  compiled one), fills the bitmasks of a step's grammar rows on llguidance's thread pool (the GIL is released)
  and hands the sampler one `TokenBitmask` for the batch. The matcher lives on the scheduler's `Request` and
  consumes every accepted token (`EngineCore._accepted`), whoever sampled it (a step, a prefill worker, a
  remote prefill instance).

Why llguidance rather than xgrammar: one abi3 wheel with no dependencies (xgrammar pulls transformers,
apache-tvm-ffi and pydantic), its tokenizer comes from `tokenizer.json` alone, and grammars compile lazily
(a schema costs about a millisecond, so nothing waits for a compile in the step loop)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llguidance
import msgspec
import torch
from torch import Tensor

from semipd_kernels import ops
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.forward_batch import to_device
from semipd_runtime.request import Request, RequestStatus

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark")
_CACHE_SIZE = 512  # distinct grammars kept compiled (front end: validated texts; core: template matchers)
# compact JSON (no free whitespace): fewer tokens, and a small model cannot wander into endless spaces
_JSON_OPTIONS: Any = {"whitespace_flexible": False}


class StructuredOutput(msgspec.Struct, frozen=True):
    """What the output must match. kind: "json_schema" (value: the schema as JSON text), "json_object" (any
    JSON object; value unused), "regex" or "lark" (value: the pattern / grammar)."""

    kind: str
    value: str = ""


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar text for spec (not validated yet); InvalidRequestError when spec is malformed."""
    if spec.kind not in GRAMMAR_KINDS:
        raise InvalidRequestError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {spec.kind!r}")
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except ValueError as e:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("the JSON schema must be an object (or a boolean)")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidRequestError(f"invalid JSON schema: {e}") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    return llguidance.LLMatcher.grammar_from_lark(spec.value)


def load_tokenizer(model_dir: str | Path, vocab_size: int, eos_token_id: int | None) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer: bitmasks cover `vocab_size` (the logits' width, which may
    exceed the tokenizer's), and a grammar that may end allows `eos_token_id`."""
    text = (Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")
    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos_token_id)


class _Lru:
    """A small thread-safe LRU map (the front end validates from several preparation threads)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class GrammarCompiler:
    """Front end: StructuredOutput -> validated grammar text, cached by spec. The tokenizer loads on first use
    (about 0.25 s for a 49k vocabulary), so engines that never see a grammar do not pay for it."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None) -> None:
        self.model_dir, self.vocab_size, self.eos_token_id = model_dir, vocab_size, eos_token_id
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache = _Lru(_CACHE_SIZE)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.model_dir, self.vocab_size, self.eos_token_id)
            return self._tokenizer

    def compile(self, spec: StructuredOutput) -> str:
        """The grammar text the core builds matchers from; InvalidRequestError (why) when it cannot compile.
        Blocking (a large schema may take a while): the server runs it off the event loop."""
        hit = self._cache.get(spec)
        if hit is not None:
            return str(hit)
        text = grammar_text(spec)
        error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise InvalidRequestError(f"cannot compile the {spec.kind} grammar: {error}")
        self._cache.put(spec, text)
        return text


class RequestGrammar:
    """One completion's matcher: it has consumed every accepted output token of its request (the scheduler's
    `Request` holds it, so a preempted request resumes where its grammar was)."""

    __slots__ = ("matcher", "words")

    def __init__(self, matcher: llguidance.LLMatcher, words: int) -> None:
        self.matcher, self.words = matcher, words

    def accept(self, token: int) -> str:
        """Advance by an accepted token; "" or why the grammar rejects it (then the request cannot go on)."""
        if self.matcher.consume_token(token):
            return ""
        return self.matcher.get_error() or f"token {token} does not fit the grammar"

    @property
    def terminated(self) -> bool:
        """The grammar is complete and allows nothing more (the request ends with finish_reason "stop")."""
        return bool(self.matcher.is_stopped())

    def mask_bytes(self) -> bytes:
        """The next token's mask as int32 words in native order (what a prefill item carries)."""
        host = torch.empty(self.words, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(host.data_ptr(), self.words * 4)
        return host.numpy().tobytes()


@dataclass(slots=True)
class TokenBitmask:
    """The grammar rows of one sampling call: row indices into the logits and their packed masks, on the
    logits' device (one bit per token, 1 = allowed)."""

    rows: Tensor  # int64 [G]
    words: Tensor  # int32 [G, ceil(vocab / 32)]

    @torch.inference_mode()  # the logits come out of the model's inference-mode forward
    def apply(self, logits: Tensor) -> None:
        """-inf for every banned token of the grammar rows, in place; the other rows are untouched."""
        ops.apply_token_bitmask(logits, self.words, self.rows)


class GrammarRuntime:
    """Core side: matchers for requests, bitmasks for steps. Built lazily by the core on the first grammar."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None) -> None:
        self.tokenizer = load_tokenizer(model_dir, vocab_size, eos_token_id)
        self.words = (vocab_size + 31) // 32
        self._templates = _Lru(_CACHE_SIZE)
        self._executor = llguidance.LLExecutor()

    def matcher(self, grammar: str) -> RequestGrammar:
        """A fresh matcher for grammar text from `GrammarCompiler.compile` (a copy of a cached compiled one);
        ValueError when it does not compile here."""
        template = self._templates.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)  # errors: ours to log
            if template.is_error():
                raise ValueError(template.get_error())
            self._templates.put(grammar, template)
        return RequestGrammar(template.deep_copy(), self.words)

    def _fill(self, matchers: list[llguidance.LLMatcher], pin: bool) -> Tensor:
        host = torch.empty((len(matchers), self.words), dtype=torch.int32, pin_memory=pin)
        row_bytes = self.words * 4
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(host.data_ptr(), row_bytes)
        else:  # on llguidance's threads, without the GIL
            self._executor.unsafe_compute_mask_ptr(list(zip(matchers, range(len(matchers)))), host.data_ptr(),
                                                   row_bytes, len(matchers))
        return host

    def bitmask(self, rows: list[int], grammars: list[RequestGrammar], device: torch.device) -> TokenBitmask:
        """The next-token masks of `grammars` (each has consumed its request's every known token) for logits
        rows `rows`. On CUDA the copies are queued from pinned memory: the host does not wait for the device
        (the caching host allocator reuses a pinned block only once its copy is done)."""
        cuda = device.type == "cuda"
        host = self._fill([g.matcher for g in grammars], pin=cuda)
        words = host.to(device, non_blocking=True) if cuda else host
        return TokenBitmask(to_device(rows, torch.long, device), words)


class CoreGrammars:
    """The engine core's side of structured output: matchers for its requests and the masks of its steps. The
    `GrammarRuntime` (the tokenizer's first load: ~0.25 s for a 49k vocabulary) is built on the first request
    with a grammar, so an engine that never sees one pays nothing.

    Where the overlap happens: a step's forward is already queued on the device when its masks are asked for.
    A mask needs every token before the one it constrains, and in overlap mode the newest of those is the step
    in flight's, so the core resolves that step early (`needs_tokens`; its events go out with this step's), and
    its tokens advance the matchers in `EngineCore._accepted`. The host then computes the masks on llguidance's
    threads while the device runs this step's forward; only the sampling kernels queued after it wait for the
    masks. A step without grammar rows resolves the step in flight after its own launch as before."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None, tp_size: int = 1) -> None:
        self.model_dir, self.vocab_size, self.eos_token_id, self.tp_size = model_dir, vocab_size, eos_token_id, tp_size
        self.runtime: GrammarRuntime | None = None

    def attach(self, req: Request, grammar: str) -> str:
        """Give req its matcher; "" or why it cannot have one."""
        if self.tp_size > 1:
            return "structured output is not supported with tensor parallelism yet"
        if self.runtime is None:
            self.runtime = GrammarRuntime(self.model_dir, self.vocab_size, self.eos_token_id)
        try:
            req.grammar = self.runtime.matcher(grammar)
        except ValueError as e:
            return f"cannot compile the grammar: {e}"
        return ""

    def needs_tokens(self, reqs: list[Request]) -> bool:
        """Whether a step sampling reqs has grammar rows (then the step in flight must resolve first)."""
        return self.runtime is not None and any(r.grammar is not None for r in reqs)

    def bitmask(self, reqs: list[Request], device: torch.device) -> TokenBitmask | None:
        """The masks of a step's sampled rows reqs (None: no row has a grammar, nothing is paid). A request that
        finished at the step in flight's token keeps an unmasked row: its token is discarded at resolve."""
        if self.runtime is None:
            return None
        rows = [j for j, r in enumerate(reqs) if r.grammar is not None and r.status is not RequestStatus.FINISHED]
        if not rows:
            return None
        return self.runtime.bitmask(rows, [g for j in rows if (g := reqs[j].grammar) is not None], device)


def bitmask_from_bytes(masks: list[bytes], rows: list[int], device: torch.device) -> TokenBitmask:
    """`TokenBitmask` from masks made by `GrammarRuntime.bitmask_bytes` (a prefill worker's grammar rows)."""
    host = torch.stack([torch.frombuffer(bytearray(m), dtype=torch.int32) for m in masks])
    cuda = device.type == "cuda"
    words = host.pin_memory().to(device, non_blocking=True) if cuda else host
    return TokenBitmask(to_device(rows, torch.long, device), words)
