"""What the server uses of an engine, named once: `semipd_runtime.Engine` satisfies it, and so does the small fake
engine of the HTTP unit tests. Runtime-checkable, so a test can assert that both still do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from os import PathLike
from typing import Any, Protocol, runtime_checkable

from semipd_runtime import EngineStats, RequestOutput, SamplingParams
from semipd_runtime.config import EngineConfig
from semipd_runtime.grammar import StructuredOutput

Prompt = str | list[int]
Bootstrap = tuple[str, int | None, int | str]  # a PD pair's (bootstrap host, port or None, room) for one prompt


@runtime_checkable
class ServedTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str: ...

    @property
    def supports_tools(self) -> bool:
        """The chat template renders tool definitions (its `tools` variable)."""
        ...


@runtime_checkable
class ServedEngine(Protocol):
    # read-only properties: plain attributes satisfy them too
    @property
    def tokenizer(self) -> ServedTokenizer: ...

    @property
    def model_name(self) -> str: ...

    @property
    def model_path(self) -> str | PathLike[str]: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def mode(self) -> str: ...

    @property
    def config(self) -> EngineConfig: ...

    @property
    def max_running_requests(self) -> int: ...

    @property
    def max_queued_requests(self) -> int | None: ...

    @property
    def is_alive(self) -> bool:
        """False once the engine core died (its requests were failed)."""
        ...

    def shutdown(self) -> None: ...

    def stats(self) -> EngineStats:
        """The engine core's last report (a copy)."""
        ...

    def refresh_stats(self, timeout_s: float = 5.0, flush_cache: bool = False) -> EngineStats:
        """Fresh numbers (one round trip to the core); raises if the core is dead or does not answer.
        flush_cache: evict the prefix cache's unreferenced pages first."""
        ...

    async def check_health(self) -> None:
        """Raises unless the engine core answers and reports itself healthy."""
        ...

    def reject_room(self, bootstrap: tuple[str, int | None, int | str], n: int, error: str) -> None: ...

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        bootstrap: Bootstrap | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def compile_grammar(self, spec: StructuredOutput) -> str:
        """Validate a structured-output spec (cached); InvalidRequestError when it cannot compile. Blocking."""
        ...
