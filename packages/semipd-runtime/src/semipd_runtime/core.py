"""EngineCore: scheduler + model runner + sampler behind a token-level API (no text, no asyncio).

The front end (`Engine`) talks to it in-process through a thread, or across a process boundary with the same
messages (`core_client.py`).

A step is launched (inputs built, forward and sampling queued on the device, a copy of the tokens to host
memory started) and later resolved (wait for that copy, accept the tokens, emit events). With
`overlap_schedule` the core schedules and launches step N+1 before it resolves step N, so the device is never
idle while the host schedules: tokens N samples are placeholders in N+1's inputs, filled on the device; a
request that turns out to stop at N had a row in N+1, discarded; pages released while a step that includes
their request is in flight come back when it resolves (`Scheduler.resolved`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from semipd_memory import KVPool, PageAllocator, RadixCache
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.forward_batch import to_device
from semipd_runtime.messages import AddRequest, EngineStats, TokenEvent, TokenLogprobMsg
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.models.loader import load_model
from semipd_runtime.request import Request, RequestStatus
from semipd_runtime.sampler import SampledTokens, Sampler
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
    # schedule and launch step N+1 before reading step N's tokens (SGLang's overlap scheduler): the device never
    # waits for the host between steps; same outputs
    overlap_schedule: bool = True

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


@dataclass(slots=True)
class StepInFlight:
    """A launched step: its sampled tokens stay on the device (the next step reads its placeholders there)
    until `EngineCore.resolve` reads their host copy."""

    step: int  # the scheduler's number of it
    requests: list[Request]  # the sampled ones, by row
    index: list[int]  # where each row's placeholder sits in its request's output_ids
    sampled: SampledTokens | None
    done: torch.cuda.Event | None  # recorded after all its work (CUDA)
    launched_at: float
    num_requests: int
    num_context: int  # tokens in the cache before the step (its requests')
    elapsed_s: float = 0.0  # set by resolve: from max(launch, the step before done) to done


def _record_event(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


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
        self.scheduler.ends = self._ends
        self.inflight: StepInFlight | None = None  # overlap mode: launched, not resolved yet
        self._last_done_at = 0.0
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
        return self.scheduler.has_work() or self.inflight is not None

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
        """Overlap mode: schedule and launch step N+1, then resolve step N (the device runs N+1 while the host
        reads N's tokens and builds N+2). Otherwise: launch and resolve the one step."""
        self.expire()
        events, self.pending = self.pending, []
        batch = self.scheduler.schedule()
        if not self.cfg.overlap_schedule:
            if batch is not None:
                events += self.run_batch(batch)
            return events
        prev = self.inflight
        self.inflight = self.launch(batch, prev) if batch is not None else None
        if prev is not None:
            events += self.resolve(prev)
        return events

    def run_batch(self, batch: ScheduledBatch) -> list[TokenEvent]:
        """One forward over the batch, sample where a request reached its last known token, emit events."""
        return self.resolve(self.launch(batch))

    def launch(self, batch: ScheduledBatch, prev: StepInFlight | None = None) -> StepInFlight:
        """Queue the forward over the batch and the sampling of each request that reaches its last known token;
        nothing here waits for the device. A sampled request gets a placeholder output id (-1 - its row) until
        `resolve`; placeholders among the inputs are the tokens of `prev`, the step still in flight, read
        on the device."""
        t0 = time.perf_counter()
        if prev is not None and prev.done is not None:  # the stream may be another one (a new SM split)
            torch.cuda.current_stream(self.runner.device).wait_event(prev.done)
        sample_rows = [i for i in range(len(batch.requests)) if batch.samples(i)]
        chunks = [r.token_slice(r.num_computed, r.num_computed + n)
                  for r, n in zip(batch.requests, batch.num_new_tokens)]
        starts = [r.num_computed for r in batch.requests]
        table = self.allocator.req_to_page
        page_table = table.index_select(0, to_device([r.slot for r in batch.requests], torch.long, table.device))
        prev_tokens = prev.sampled.tokens if prev is not None and prev.sampled is not None else None
        if prev_tokens is not None and prev_tokens.is_cuda:  # read here, maybe on another stream than its own
            prev_tokens.record_stream(torch.cuda.current_stream(self.runner.device))
        logits = self.runner.forward(chunks, starts, page_table, sample_rows, prev_tokens)
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed += n
            if req.num_computed - n < len(req.prompt_ids) <= req.num_computed:
                # prompt done: later requests share its full pages from now on (readers run after this step
                # on the same stream), not only once it ends
                self.cache.publish(req.slot, req.prompt_ids)
        self.num_steps += 1
        step = self.scheduler.launched(batch)
        reqs = [batch.requests[i] for i in sample_rows]
        sampled = None
        if reqs:
            sampled = self.sampler.sample(logits, [r.sampling for r in reqs], [len(r.output_ids) for r in reqs])
        index = []
        for j, req in enumerate(reqs):
            index.append(len(req.output_ids))
            req.output_ids.append(-1 - j)
        done = sampled.ready if sampled is not None else _record_event(logits.device)
        return StepInFlight(step, reqs, index, sampled, done, t0, len(batch.requests), sum(starts))

    def resolve(self, st: StepInFlight) -> list[TokenEvent]:
        """Wait for a launched step (its own work, nothing queued after it), put its tokens in place of the
        placeholders, release what waited for it, finish requests, emit their events. A request that ended
        after the step was launched (stop token of the step before, abort) has its row discarded."""
        tokens, logprobs = st.sampled.read() if st.sampled is not None else ([], [])
        if st.sampled is None and st.done is not None:
            st.done.synchronize()
        now = time.perf_counter()
        st.elapsed_s = now - max(st.launched_at, self._last_done_at)  # the step's own time, not its overlap
        self._last_done_at = now
        self.scheduler.resolved(st.step)
        events = []
        for req, i, tok, lp in zip(st.requests, st.index, tokens, logprobs):
            if req.status is not RequestStatus.FINISHED:
                req.output_ids[i] = tok
                events.append(self._accepted(req, i, tok, lp))
        return events

    def accept_token(self, req: Request, tok: int, lp: TokenLogprobMsg | None) -> TokenEvent:
        req.output_ids.append(tok)
        return self._accepted(req, len(req.output_ids) - 1, tok, lp)

    def _accepted(self, req: Request, i: int, tok: int, lp: TokenLogprobMsg | None) -> TokenEvent:
        """output_ids[i] = tok is known now: finish req if it ends there."""
        reason = self._finish_reason(req, tok, i + 1)
        if reason is not None:
            del req.output_ids[i + 1 :]  # the placeholder of a step in flight: that row is discarded
            self.scheduler.finish(req, reason)
            self.requests.pop(req.rid, None)
        return TokenEvent(req.rid, [tok], None if lp is None else [lp], reason)

    def _finish_reason(self, req: Request, tok: int, num_out: int) -> str | None:
        """Why req ends at its num_out-th output token tok (None: it goes on)."""
        s = req.sampling
        if (not s.ignore_eos and tok in self.eos) or tok in s.stop_token_ids:
            return "stop"
        return "length" if self._reaches_length(req, num_out) else None

    def _reaches_length(self, req: Request, num_out: int) -> bool:
        """num_out output tokens are req's last: max_tokens or the context is reached."""
        return num_out >= req.sampling.max_tokens or len(req.prompt_ids) + num_out >= self.cfg.max_model_len

    def _ends(self, req: Request) -> bool:
        """Its newest output id (a placeholder) is its last whatever its value: never schedule it again."""
        return self._reaches_length(req, len(req.output_ids))

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
