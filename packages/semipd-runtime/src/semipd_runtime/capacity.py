"""What fits: how many KV pages the memory budget allows, and whether a request can ever run (context and pool
size). Checked by the front end before a request is sent and by the core when it arrives."""

from __future__ import annotations

import torch

from semipd_memory import KVPool
from semipd_runtime.config import EngineConfig
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.models.config import ModelConfig


def kv_pages_for(cfg: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cfg.scheduler.num_pages is not None:
        return cfg.scheduler.num_pages
    shape = (mcfg.num_layers, cfg.scheduler.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free - total * (1.0 - cfg.scheduler.mem_fraction_static))
    else:
        budget = cfg.scheduler.cpu_kv_budget_bytes
    pages = KVPool.pages_for_budget(max(budget, 0), *shape)
    if pages < 1:
        raise RuntimeError(f"no memory left for the KV cache (budget {budget} bytes); lower the model size")
    return pages


def check_fits(num_prompt: int, max_tokens: int, max_model_len: int, page_size: int,
               num_pages: int | None) -> None:
    """Raise InvalidRequestError for a request that can never run (context or KV pool too small)."""
    if num_prompt < 1:
        raise InvalidRequestError("prompt must contain at least one token", param="prompt")
    if num_prompt >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {num_prompt} tokens; this model's context is {max_model_len} tokens", param="prompt")
    if num_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"this model's context is {max_model_len} tokens, but {num_prompt + max_tokens} were requested "
            f"({num_prompt} in the prompt, {max_tokens} in max_tokens); reduce the prompt or max_tokens",
            param="max_tokens")
    need = -(-(num_prompt + max_tokens) // page_size)
    if num_pages is not None and need > num_pages:
        raise InvalidRequestError(f"request needs {need} KV pages but the pool has only {num_pages}",
                                  param="max_tokens")
