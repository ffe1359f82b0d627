"""EngineCore: scheduler + model runner + sampler behind a token-level API (no text, no asyncio).

The front end (`Engine`) talks to it in-process through a thread, or across a process boundary with the same
messages (`core_client.py`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from semipd_memory import KVPool, PageAllocator, RadixCache
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.messages import AddRequest, EngineStats, TokenEvent, TokenLogprobMsg
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.models.loader import load_model
from semipd_runtime.request import Request, RequestStatus
from semipd_runtime.sampler import Sampler
from semipd_runtime.scheduler import ScheduledBatch, Scheduler
from semipd_runtime.slo_control import SloSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CoreConfig:
    model_path: str
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    eos_token_ids: list[int]
    max_running_requests: int = 64
    chunked_prefill_size: int = 512
    page_size: int = 16
    num_pages: int | None = None
    mem_fraction_static: float = 0.85
    cpu_kv_budget_bytes: int = 1 << 30
    enable_radix_cache: bool = True  # share cached prompt prefixes (full pages) between requests
    # per-state timeouts (seconds, None = no limit): an expired request ends with finish_reason "abort"
    queue_timeout_s: float | None = None
    prefill_timeout_s: float | None = None
    decode_timeout_s: float | None = None
    # semi-PD
    mode: str = "unified"  # "unified" | "semi-pd"
    sm_partition: str = "none"  # "none" | "green" | "mps"
    prefill_placement: str = "process"  # "process" | "thread"
    prefill_sm_percent: int = 50
    decode_sm_percent: int = 50
    max_prefill_tokens: int = 8192  # tokens per batch sent to the prefill worker (a longer prompt goes alone)
    # decode CUDA graphs (CUDA only): batch sizes up to cuda_graph_max_bs (None: max_running_requests, <= 256)
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    load_format: str = "auto"  # "auto" (safetensors) | "dummy" (random weights at the config's shapes)
    slo: SloSettings | None = None  # semi-PD partition_policy "slo" (None: static split)

    def graph_max_bs(self) -> int:
        if self.disable_cuda_graph:
            return 0
        return self.cuda_graph_max_bs if self.cuda_graph_max_bs is not None else min(self.max_running_requests, 256)


def kv_pages_for(cfg: CoreConfig, mcfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cfg.num_pages is not None:
        return cfg.num_pages
    shape = (mcfg.num_layers, cfg.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free - total * (1.0 - cfg.mem_fraction_static))
    else:
        budget = cfg.cpu_kv_budget_bytes
    pages = KVPool.pages_for_budget(max(budget, 0), *shape)
    if pages < 1:
        raise RuntimeError(f"no memory left for the KV cache (budget {budget} bytes); lower the model size")
    return pages


class EngineCore:
    # the SM partition decode runs in (semi-PD's decode worker overrides it); graphs are captured inside it
    decode_context: Callable[[], AbstractContextManager[object]] = nullcontext

    def __init__(self, cfg: CoreConfig, model: LlamaForCausalLM | None = None) -> None:
        self.cfg = cfg
        device = torch.device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        self.model = model if model is not None else load_model(cfg.model_path, device, dtype, cfg.load_format)
        mcfg = self.model.config
        num_pages = kv_pages_for(cfg, mcfg, dtype, device)
        max_pages_per_req = -(-cfg.max_model_len // cfg.page_size)
        self.allocator = PageAllocator(
            num_pages, cfg.page_size, cfg.max_running_requests, max_pages_per_req, device=device
        )
        self.kv_pool = KVPool(
            mcfg.num_layers, num_pages, cfg.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, device
        )
        if cfg.cuda_graph_max_bs is not None and cfg.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {cfg.cuda_graph_max_bs}")
        self.runner = ModelRunner(self.model, self.kv_pool, cfg.page_size, cfg.max_model_len,
                                  cuda_graph_max_bs=cfg.graph_max_bs())
        self.cache = RadixCache(self.allocator, enabled=cfg.enable_radix_cache)
        self.scheduler = Scheduler(
            self.allocator,
            max_running_requests=cfg.max_running_requests,
            chunked_prefill_size=cfg.chunked_prefill_size,
            cache=self.cache,
        )
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.eos = set(cfg.eos_token_ids)
        self.num_steps = 0
        self.pending: list[TokenEvent] = []  # events produced outside step() (aborts, rejections)
        self._last_expiry = 0.0
        log.info("KV pool: %d pages x %d tokens on %s (%s), radix cache %s", num_pages, cfg.page_size, device,
                 cfg.dtype, "on" if cfg.enable_radix_cache else "off")

    def warm_up(self) -> None:
        """Compile the kernels of the step shapes this core runs outside CUDA graphs (CUDA only): mixed
        prefill+decode steps up to the chunk size in unified mode, eager decode batches above the graph sizes."""
        with self.decode_context():
            dt = self.runner.warm_up(self.warm_up_tokens(), self.cfg.max_running_requests, self.sampler)
        if dt:
            log.info("warmed up in %.2fs", dt)

    def warm_up_tokens(self) -> int:
        return self.cfg.chunked_prefill_size

    def capture_cuda_graphs(self) -> None:
        """Capture the decode graphs now, inside the decode partition, rather than on each size's first use."""
        if self.runner.graphs is not None:
            with self.decode_context():
                self.runner.graphs.capture()

    # --- requests -------------------------------------------------------------------------------------------
    def check_fits(self, num_prompt: int, max_tokens: int) -> None:
        """Raise InvalidRequestError for a request that can never run (context or pool too small)."""
        if num_prompt < 1:
            raise InvalidRequestError("prompt must contain at least one token", param="prompt")
        ctx = self.cfg.max_model_len
        if num_prompt >= ctx:
            raise InvalidRequestError(
                f"prompt has {num_prompt} tokens; this model's context is {ctx} tokens", param="prompt"
            )
        if num_prompt + max_tokens > ctx:
            raise InvalidRequestError(
                f"this model's context is {ctx} tokens, but {num_prompt + max_tokens} were requested "
                f"({num_prompt} in the prompt, {max_tokens} in max_tokens); reduce the prompt or max_tokens",
                param="max_tokens",
            )
        need = self.allocator.pages_needed(num_prompt + max_tokens)
        if need > self.allocator.num_pages:
            raise InvalidRequestError(
                f"request needs {need} KV pages but the pool has only {self.allocator.num_pages}",
                param="max_tokens",
            )

    def add_request(self, msg: AddRequest) -> None:
        if msg.rid in self.requests:
            self.pending.append(TokenEvent(msg.rid, [], None, "abort", f"duplicate request id {msg.rid}", 400))
            return
        try:
            self.check_fits(len(msg.prompt_ids), msg.sampling.max_tokens)
        except InvalidRequestError as e:
            self.pending.append(TokenEvent(msg.rid, [], None, "abort", e.message, 400))
            return
        req = Request(msg.rid, list(msg.prompt_ids), msg.sampling)
        self.requests[msg.rid] = req
        self.scheduler.add(req)

    def abort(self, rid: str, reason: str = "abort", error: str | None = None, status: int = 0) -> None:
        req = self.requests.pop(rid, None)
        if req is None or req.status is RequestStatus.FINISHED:
            return
        self.scheduler.finish(req, reason)
        self.pending.append(TokenEvent(rid, [], None, reason, error, status))

    def expire(self) -> None:
        """Abort requests that stayed too long in one state (checked at most twice a second)."""
        now = time.monotonic()
        if now - self._last_expiry < 0.5:
            return
        self._last_expiry = now
        limits = {
            RequestStatus.WAITING: self.cfg.queue_timeout_s,
            RequestStatus.PREFILLING: self.cfg.prefill_timeout_s,
            RequestStatus.RUNNING: self.cfg.decode_timeout_s,
        }
        for req in list(self.requests.values()):
            limit = limits.get(req.status)
            if limit is not None and now - req.state_since > limit:
                self.abort(req.rid, "abort", f"request timed out while {req.status.value}", 504)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            pages_used=self.allocator.num_used_pages,
            pages_total=self.allocator.num_pages,
            num_steps=self.num_steps,
            cached_pages=self.allocator.num_cached_pages,
            evictable_pages=self.allocator.num_evictable_pages,
            prefix_hit_tokens=self.cache.hit_tokens,
            prefix_query_tokens=self.cache.query_tokens,
        )

    # --- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self.expire()
        events, self.pending = self.pending, []
        batch = self.scheduler.schedule()
        if batch is not None:
            events += self.run_batch(batch)
        return events

    def run_batch(self, batch: ScheduledBatch) -> list[TokenEvent]:
        """One forward over the batch, sample where a request reached its last known token, emit events."""
        sample_rows = [i for i in range(len(batch.requests)) if batch.samples(i)]
        chunks = [r.token_slice(r.num_computed, r.num_computed + n)
                  for r, n in zip(batch.requests, batch.num_new_tokens)]
        table = self.allocator.req_to_page
        slots = torch.tensor([r.slot for r in batch.requests], dtype=torch.long, device=table.device)
        page_table = table.index_select(0, slots)
        logits = self.runner.forward(chunks, [r.num_computed for r in batch.requests], page_table, sample_rows)
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed += n
        self.num_steps += 1
        if not sample_rows:
            return []
        reqs = [batch.requests[i] for i in sample_rows]
        tokens, logprobs = self.sampler(logits, [r.sampling for r in reqs], [len(r.output_ids) for r in reqs])
        return [self.accept_token(req, tok, lp) for req, tok, lp in zip(reqs, tokens, logprobs)]

    def accept_token(self, req: Request, tok: int, lp: TokenLogprobMsg | None) -> TokenEvent:
        req.output_ids.append(tok)
        reason = self._finish_reason(req, tok)
        if reason is not None:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.rid, None)
        return TokenEvent(req.rid, [tok], None if lp is None else [lp], reason)

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        s = req.sampling
        if (not s.ignore_eos and tok in self.eos) or tok in s.stop_token_ids:
            return "stop"
        if len(req.output_ids) >= s.max_tokens or req.seq_len >= self.cfg.max_model_len:
            return "length"
        return None

    def close(self) -> None:
        """Release workers the core started (none for the unified core)."""

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[TokenEvent]:
        """Offline helper: step until every request finished."""
        out: list[TokenEvent] = []
        t0 = time.monotonic()
        for _ in range(max_steps):
            out += self.step()
            if not self.has_work() and not self.pending:
                break
        log.debug("run_until_idle: %d steps in %.2fs", self.num_steps, time.monotonic() - t0)
        return out
