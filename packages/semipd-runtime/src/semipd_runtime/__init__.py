"""semipd_runtime: models, scheduler, sampler, engine core and the offline/streaming `Engine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from semipd_runtime.outputs import CompletionOutput, RequestOutput, TokenLogprob
from semipd_runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from semipd_runtime.engine import Engine

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams", "TokenLogprob"]


def __getattr__(name: str) -> object:
    # Engine pulls in torch + the model stack; import it lazily so light users (partitioner, messages) stay light
    if name == "Engine":
        from semipd_runtime.engine import Engine

        return Engine
    raise AttributeError(name)
