"""Engine: the front end users and the server call. Tokenizes, fans out `n`, detokenizes incrementally, applies
stop strings, and hands token-level work to an EngineCore (thread or process)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import torch

from semipd_runtime.core import CoreConfig
from semipd_runtime.core_client import ProcessCoreClient, ThreadCoreClient
from semipd_runtime.errors import EngineDeadError, InvalidRequestError, QueueFullError
from semipd_runtime.messages import (
    AbortRequest,
    AddRequest,
    CoreFailure,
    CoreReady,
    CoreSampling,
    EngineStats,
    FromCore,
    Repartition,
    StatsRequest,
    StepOutput,
)
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.default_model import resolve_model_path
from semipd_runtime.models.loader import LOAD_FORMATS
from semipd_runtime.outputs import RequestOutput
from semipd_runtime.partition import percent_from_env
from semipd_runtime.sampling_params import SamplingParams
from semipd_runtime.slo_control import SloSettings
from semipd_runtime.tokenizer import Tokenizer
from semipd_runtime.tracked_request import TrackedRequest

log = logging.getLogger(__name__)
Prompt = str | list[int]


class Engine:
    def __init__(
        self,
        model_path: str | Path | None = None,
        mode: str = "unified",
        *,
        max_running_requests: int = 64,
        max_queued_requests: int | None = None,
        chunked_prefill_size: int = 512,
        page_size: int = 16,
        num_pages: int | None = None,
        mem_fraction_static: float = 0.85,
        max_model_len: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        core: str = "thread",
        sm_partition: str = "none",
        prefill_sm_percent: int | None = None,
        decode_sm_percent: int | None = None,
        prefill_placement: str = "process",
        max_prefill_tokens: int = 8192,
        queue_timeout_s: float | None = None,
        prefill_timeout_s: float | None = None,
        decode_timeout_s: float | None = None,
        cuda_graph_max_bs: int | None = None,
        disable_cuda_graph: bool = False,
        load_format: str = "auto",
        partition_policy: str = "static",
        slo_ttft_ms: float = 1000.0,
        slo_tpot_ms: float = 50.0,
        repartition_interval_s: float = 2.0,
        slo_options: Mapping[str, Any] | None = None,
        enable_radix_cache: bool = True,
        disable_overlap_schedule: bool = False,
    ) -> None:
        """partition_policy "slo" (semi-pd only): an SLO-aware controller moves the SM split at run time to keep
        TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms, re-deciding every repartition_interval_s; `slo_options`
        sets the other SloSettings fields (e.g. profile_splits, profile_cache_dir, min_dwell_s).
        disable_overlap_schedule: resolve each step before scheduling the next (by default step N+1 is
        scheduled and launched while step N runs on the device; same outputs)."""
        if mode not in ("unified", "semi-pd"):
            raise ValueError(f"mode must be 'unified' or 'semi-pd', got {mode!r}")
        if sm_partition not in ("none", "green", "mps"):
            raise ValueError(f"sm_partition must be one of none, green, mps; got {sm_partition!r}")
        if prefill_placement not in ("process", "thread"):
            raise ValueError(f"prefill_placement must be 'process' or 'thread', got {prefill_placement!r}")
        prefill_pct = percent_from_env("prefill_sm_percent", prefill_sm_percent, "SEMI_PD_PREFILL_SM_PERCENTILE", 50)
        decode_pct = percent_from_env("decode_sm_percent", decode_sm_percent, "SEMI_PD_DECODE_SM_PERCENTILE",
                                      100 - prefill_pct if prefill_sm_percent is not None else 50)
        slo = _slo_settings(mode, partition_policy, slo_ttft_ms, slo_tpot_ms, repartition_interval_s, slo_options)
        if not isinstance(enable_radix_cache, bool):
            raise TypeError(f"enable_radix_cache must be a bool, got {type(enable_radix_cache).__name__}")
        if core not in ("thread", "process"):
            raise ValueError(f"core must be 'thread' or 'process', got {core!r}")
        for name, v in (("max_running_requests", max_running_requests), ("page_size", page_size),
                        ("chunked_prefill_size", chunked_prefill_size), ("max_prefill_tokens", max_prefill_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
        if cuda_graph_max_bs is not None and cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {cuda_graph_max_bs}")
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        if not 0.0 < mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        path = resolve_model_path(model_path)
        self.model_path = path
        self.model_name = path.name if model_path is not None else "SmolLM2-135M-Instruct"
        self.model_config = ModelConfig.from_dir(path)
        self.tokenizer = Tokenizer.from_dir(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        self.max_model_len = min(max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        eos = set(self.tokenizer.eos_token_ids)
        gen_cfg = path / "generation_config.json"
        if gen_cfg.is_file():
            e = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos |= set(e if isinstance(e, list) else [] if e is None else [e])
        self.max_running_requests = max_running_requests
        self.max_queued_requests = max_queued_requests
        self._cfg = CoreConfig(
            model_path=str(path), device=device, dtype=dtype, max_model_len=self.max_model_len,
            eos_token_ids=sorted(eos), max_running_requests=max_running_requests,
            chunked_prefill_size=chunked_prefill_size, page_size=page_size, num_pages=num_pages,
            mem_fraction_static=mem_fraction_static, queue_timeout_s=queue_timeout_s,
            prefill_timeout_s=prefill_timeout_s, decode_timeout_s=decode_timeout_s, mode=mode,
            sm_partition=sm_partition, prefill_placement=prefill_placement, prefill_sm_percent=prefill_pct,
            decode_sm_percent=decode_pct, max_prefill_tokens=max_prefill_tokens, slo=slo,
            cuda_graph_max_bs=cuda_graph_max_bs, disable_cuda_graph=disable_cuda_graph, load_format=load_format,
            enable_radix_cache=enable_radix_cache, overlap_schedule=not disable_overlap_schedule,
        )
        self.mode = mode
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[TrackedRequest, int]] = {}  # core rid -> (request, completion index)
        self._stats = EngineStats()
        self._stats_event = threading.Event()
        self._dead: str | None = None
        self._page_size = page_size
        self._ids = itertools.count()
        if mode == "semi-pd" and sm_partition == "mps":
            # under MPS every role is a process started with its SM percentage
            from semipd_runtime.partition import check_mps_daemon

            check_mps_daemon()
            core = "process"
            env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(decode_pct)}
            self._client: ThreadCoreClient | ProcessCoreClient = ProcessCoreClient(self._cfg, self._on_output, env=env)
        elif core == "process":
            self._client = ProcessCoreClient(self._cfg, self._on_output)
        else:
            self._client = ThreadCoreClient(self._cfg, self._on_output)
        if self._dead:
            raise RuntimeError(self._dead)
        log.info("engine ready: model %s, %d KV pages of %d tokens, context %d, core=%s",
                 self.model_name, self._stats.pages_total, page_size, self.max_model_len, core)

    # --- submission -----------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of token ids", param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt")
        return list(prompt)

    def _check_fits(self, n_prompt: int, params: SamplingParams) -> None:
        ctx = self.max_model_len
        if n_prompt == 0:
            raise InvalidRequestError("prompt must contain at least one token", param="prompt")
        if n_prompt >= ctx:
            raise InvalidRequestError(f"prompt has {n_prompt} tokens; this model's context is {ctx} tokens",
                                      param="prompt")
        if n_prompt + params.max_tokens > ctx:
            raise InvalidRequestError(
                f"this model's context is {ctx} tokens, but {n_prompt + params.max_tokens} were requested "
                f"({n_prompt} in the prompt, {params.max_tokens} in max_tokens); reduce the prompt or max_tokens",
                param="max_tokens")
        pages = -(-(n_prompt + params.max_tokens) // self._page_size)
        if self._stats.pages_total and pages > self._stats.pages_total:
            raise InvalidRequestError(
                f"request needs {pages} KV pages but the pool has only {self._stats.pages_total}",
                param="max_tokens")

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
               sink: Any = None) -> TrackedRequest:
        """Validate and send one request (n completions); raises InvalidRequestError / QueueFullError /
        EngineDeadError before anything is queued."""
        params = params or SamplingParams()
        params.validate(self.model_config.vocab_size)
        ids = self._prompt_ids(prompt)
        self._check_fits(len(ids), params)
        if self._dead:
            raise EngineDeadError(self._dead)
        if not self._stats.healthy:
            raise EngineDeadError(self._stats.health_error or "engine is unhealthy")
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        req = TrackedRequest(rid, ids, params, self.tokenizer, sink)
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        with self._lock:
            if any(r.request_id == rid for r, _ in self._subs.values()):
                raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
            if self.max_queued_requests is not None and (
                len(self._subs) + params.n > self.max_running_requests + self.max_queued_requests
            ):
                raise QueueFullError(
                    f"too many requests queued (limit {self.max_queued_requests}); retry later")
            core_rids = [f"{rid}#{i}" if params.n > 1 else rid for i in range(params.n)]
            for i, crid in enumerate(core_rids):
                self._subs[crid] = (req, i)
        req.core_rids = core_rids
        for i, crid in enumerate(core_rids):
            sampling = CoreSampling(
                temperature=float(params.temperature), top_p=float(params.top_p), top_k=int(params.top_k),
                min_p=float(params.min_p), seed=(base_seed + i) % (1 << 63), max_tokens=params.max_tokens,
                stop_token_ids=list(params.stop_token_ids or []), ignore_eos=params.ignore_eos,
                logprobs=params.logprobs)
            self._client.send(AddRequest(crid, ids, sampling, time.time()))
        return req

    # --- outputs from the core (background thread) ---------------------------------------------------------
    def _on_output(self, msg: FromCore) -> None:
        if isinstance(msg, CoreReady):
            self._stats = msg.stats
            return
        if isinstance(msg, CoreFailure):
            self._dead = msg.message
            with self._lock:
                pending = {r for r, _ in self._subs.values()}
                self._subs.clear()
            for req in pending:
                req.fail(EngineDeadError(msg.message))
            self._stats_event.set()
            return
        assert isinstance(msg, StepOutput)
        self._stats = msg.stats
        self._stats_event.set()
        touched: dict[int, TrackedRequest] = {}
        for ev in msg.events:
            with self._lock:
                entry = self._subs.get(ev.rid)
            if entry is None:
                continue  # already finished here (e.g. a stop string) and the core's abort echo arrives
            req, idx = entry
            stop_hit = req.on_event(idx, ev)
            if stop_hit and ev.finish_reason is None:
                self._client.send(AbortRequest(ev.rid, "stop"))
            if req.completions[idx].finish_reason is not None:
                with self._lock:
                    self._subs.pop(ev.rid, None)
            touched[id(req)] = req
        for req in touched.values():
            req.publish()

    # --- public API -----------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
            plist = list(sampling_params)
        else:
            plist = [sampling_params or SamplingParams()] * len(prompts)
        done = threading.Semaphore(0)
        reqs = [self.submit(p, sp, sink=lambda _item: done.release()) for p, sp in zip(prompts, plist)]
        for _ in reqs:
            while not done.acquire(timeout=1.0):
                if self._dead:
                    raise EngineDeadError(self._dead)
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [r.snapshot(final=True) for r in reqs]

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        def deliver(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:
                pass  # the consumer's event loop is closed: nobody is listening any more

        req = self.submit(prompt, params, request_id, sink=deliver)
        req.streaming = True
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not req.finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            crids = [c for c, (r, _) in self._subs.items() if r.request_id == request_id]
        for c in crids:
            self._client.send(AbortRequest(c))

    def stats(self) -> EngineStats:
        """The core's last report; a copy, so that callers never change what the engine goes by."""
        return msgspec.structs.replace(self._stats)

    def repartition(self, prefill_percent: float, decode_percent: float) -> None:
        """Move semi-PD to a new SM split (percent of the SMs per role) without stopping: in-flight requests
        continue; the split is in effect once the new prefill worker is ready (see stats())."""
        if self.mode != "semi-pd":
            raise ValueError("repartition needs mode='semi-pd'")
        for name, v in (("prefill_percent", prefill_percent), ("decode_percent", decode_percent)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 100:
                raise ValueError(f"{name} must be a number in [1, 100], got {v!r}")
        self._client.send(Repartition(float(prefill_percent), float(decode_percent)))

    def refresh_stats(self, timeout_s: float = 5.0) -> EngineStats:
        """Ask the core for fresh numbers (waits for its next report)."""
        if self._dead:
            raise EngineDeadError(self._dead)
        self._stats_event.clear()
        self._client.send(StatsRequest())
        if not self._stats_event.wait(timeout_s) or self._dead:
            raise EngineDeadError(self._dead or "engine core did not answer")
        return self.stats()

    async def check_health(self, timeout_s: float = 5.0) -> None:
        """Raises EngineDeadError unless the core answers and all its workers are alive."""
        await asyncio.get_running_loop().run_in_executor(None, self.refresh_stats, timeout_s)
        if not self._stats.healthy:
            raise EngineDeadError(self._stats.health_error or "engine is unhealthy")

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._client.alive

    def shutdown(self) -> None:
        self._client.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _slo_settings(mode: str, policy: str, ttft_ms: float, tpot_ms: float, interval_s: float,
                  options: Mapping[str, Any] | None) -> SloSettings | None:
    """Validated settings of the SLO policy (None under "static": today's fixed split, no controller)."""
    if policy not in ("static", "slo"):
        raise ValueError(f"partition_policy must be 'static' or 'slo', got {policy!r}")
    if policy == "slo" and mode != "semi-pd":
        raise ValueError("partition_policy='slo' needs mode='semi-pd' (unified mode has no SM split)")
    extra = dict(options or {})
    known = set(SloSettings.__dataclass_fields__) - {"policy", "slo_ttft_ms", "slo_tpot_ms",
                                                      "repartition_interval_s"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"slo_options: unknown option(s) {unknown}; known: {sorted(known)}")
    settings = SloSettings(policy=policy, slo_ttft_ms=ttft_ms, slo_tpot_ms=tpot_ms,
                           repartition_interval_s=interval_s, **extra)
    return settings if policy == "slo" else None
