"""Engine: the front end users and the server call. Tokenizes, fans out `n`, detokenizes incrementally, applies
stop strings, and hands token-level work to an EngineCore (thread or process)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import torch

from semipd_runtime.capacity import check_fits
from semipd_runtime.config import EngineConfig
from semipd_runtime.core_client import ProcessCoreClient, ThreadCoreClient
from semipd_runtime.errors import EngineDeadError, InvalidRequestError, QueueFullError
from semipd_runtime.grammar import GrammarCompiler, StructuredOutput
from semipd_runtime.messages import (
    AbortRequest,
    AddRequest,
    Bootstrap,
    CoreFailure,
    CoreReady,
    CoreSampling,
    EngineStats,
    FromCore,
    Repartition,
    RoomRejected,
    StatsRequest,
    StepOutput,
)
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.default_model import resolve_model_path
from semipd_runtime.outputs import RequestOutput
from semipd_runtime.parallel.shard import check_tp_size
from semipd_runtime.partition import partition_class
from semipd_runtime.pd_types import room_key
from semipd_runtime.sampling_params import SamplingParams
from semipd_runtime.tokenizer import Tokenizer, load_chat_template
from semipd_runtime.tracked_request import TrackedRequest

log = logging.getLogger(__name__)
Prompt = str | list[int]


class Engine:
    def __init__(self, model_path: str | Path | None = None, mode: str = "unified", *,
                 config: EngineConfig | None = None, core: str = "thread", **knobs: Any) -> None:
        """`knobs`: any EngineConfig knob by name (max_running_requests=8, sm_partition="green", ...;
        `slo_options` sets further SloSettings fields), or a whole `config`. partition_policy "slo" (semi-pd
        only): an SLO-aware controller moves the SM split at run time to keep TTFT <= slo_ttft_ms and TPOT <=
        slo_tpot_ms. disable_overlap_schedule: resolve each step before scheduling the next (by default step
        N+1 is scheduled and launched while step N runs on the device; same outputs). core: "thread" (offline)
        or "process" (the server)."""
        if config is None:
            config = EngineConfig.from_knobs(
                core=core, mode=mode, model_path=None if model_path is None else str(model_path), **knobs)
        elif knobs or model_path is not None or mode != "unified":
            raise TypeError("pass either config=EngineConfig(...) or model_path / mode / knobs, not both")
        path = resolve_model_path(config.model.model_path)
        self.model_path = path
        self.model_name = path.name if config.model.model_path is not None else "SmolLM2-135M-Instruct"
        self.model_config = ModelConfig.from_dir(path)
        m = config.model
        self.tokenizer = Tokenizer.from_dir(Path(m.tokenizer_path).expanduser() if m.tokenizer_path else path)
        if m.chat_template is not None:
            self.tokenizer.chat_template = load_chat_template(m.chat_template)
        eos = set(self.tokenizer.eos_token_ids)
        gen_cfg = path / "generation_config.json"
        if gen_cfg.is_file():
            e = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos |= set(e if isinstance(e, list) else [] if e is None else [e])
        self.config = config.resolved(max_position_embeddings=self.model_config.max_position_embeddings,
                                      eos_token_ids=sorted(eos), model_path=str(path),
                                      cuda_available=torch.cuda.is_available())
        cfg = self.config
        check_tp_size(self.model_config, cfg.parallel.tp_size, cfg.device)
        self.max_model_len = cfg.max_model_len
        self.max_running_requests = cfg.scheduler.max_running_requests
        self.max_queued_requests = cfg.scheduler.max_queued_requests
        self.mode = cfg.semi_pd.mode
        self.disaggregation_mode = cfg.semi_pd.disaggregation_mode  # "null" | "prefill" | "decode"
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[TrackedRequest, int]] = {}  # core rid -> (request, completion index)
        self._stats = EngineStats()
        self._stats_event = threading.Event()
        self._dead: str | None = None
        self._ids = itertools.count()
        self.grammars = GrammarCompiler(path, self.model_config.vocab_size, next(iter(cfg.model.eos_token_ids), None))
        # draws the seeds of requests that send none: --seed makes a whole run reproducible
        self._seeds = random.Random(cfg.model.seed)
        part = partition_class(cfg.semi_pd.sm_partition)
        self._client: ThreadCoreClient | ProcessCoreClient
        if self.mode == "semi-pd" and part.needs_core_process:
            part.check_available()  # the decode role's process starts with its share in its environment
            env = part.core_process_env(cfg.shares[1])
            self._client = ProcessCoreClient(cfg, self._on_output, env=env)
        elif cfg.core == "process" or cfg.parallel.tp_size > 1:  # the core process is tensor-parallel rank 0
            self._client = ProcessCoreClient(cfg, self._on_output)
        else:
            self._client = ThreadCoreClient(cfg, self._on_output)
        if self._dead:
            raise RuntimeError(self._dead)
        log.info("engine ready: model %s, %d KV pages of %d tokens, context %d, core=%s", self.model_name,
                 self._stats.pages_total, cfg.scheduler.page_size, self.max_model_len, cfg.core)

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

    def compile_grammar(self, spec: StructuredOutput) -> str:
        """Validate a structured-output spec (cached by spec); InvalidRequestError (param "response_format")
        when it cannot compile. Blocking: the server calls it on its preparation pool, so `submit` then finds
        it in the cache."""
        try:
            return self.grammars.compile(spec)
        except InvalidRequestError as e:
            raise InvalidRequestError(e.message, param=e.param or "response_format") from None

    def _check_fits(self, n_prompt: int, params: SamplingParams) -> None:
        check_fits(n_prompt, params.max_tokens, self.max_model_len, self.config.scheduler.page_size,
                   self._stats.pages_total or None)

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
               sink: Any = None, bootstrap: tuple[str, int | None, int | str] | None = None) -> TrackedRequest:
        """Validate and send one request (n completions); raises InvalidRequestError / QueueFullError /
        EngineDeadError before anything is queued. bootstrap: (host, port or None, room) of a PD pair, which a
        prefill or decode instance needs (`disaggregation_mode`) and other instances ignore."""
        params = params or SamplingParams()
        pd_mode = self.config.semi_pd.disaggregation_mode
        if pd_mode != "null" and bootstrap is None:
            raise InvalidRequestError(f"a {pd_mode} instance needs bootstrap_room (send requests through "
                                      "smg --pd-disaggregation)", param="bootstrap_room")
        try:
            return self._submit(prompt, params, request_id, sink, bootstrap)
        except Exception as e:
            if pd_mode == "prefill" and bootstrap is not None:
                self.reject_room(bootstrap, params.n, str(e) or type(e).__name__)
            raise

    def reject_room(self, bootstrap: tuple[str, int | None, int | str], n: int, error: str) -> None:
        """A prefill instance turns a PD request away (its `n` rooms): the decode side fails it at once."""
        if self.config.semi_pd.disaggregation_mode == "prefill" and not self._dead:
            self._client.send(RoomRejected([room_key(bootstrap[2], i) for i in range(max(n, 1))], error))

    def _submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None, sink: Any,
                bootstrap: tuple[str, int | None, int | str] | None) -> TrackedRequest:
        pd_mode = self.config.semi_pd.disaggregation_mode
        params.validate(self.model_config.vocab_size)
        grammar = self.compile_grammar(params.structured) if params.structured is not None else ""
        ids = self._prompt_ids(prompt)
        self._check_fits(len(ids), params)
        if self._dead:
            raise EngineDeadError(self._dead)
        # a core replacing a worker in place queues the request until the worker is back
        if not self._stats.healthy and not self._stats.recovering:
            raise EngineDeadError(self._stats.health_error or "engine is unhealthy")
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        req = TrackedRequest(rid, ids, params, self.tokenizer, sink, self.config.model.eos_token_ids)
        base_seed = params.seed if params.seed is not None else self._seeds.getrandbits(62)
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
                logprobs=params.logprobs, presence_penalty=float(params.presence_penalty),
                frequency_penalty=float(params.frequency_penalty),
                repetition_penalty=float(params.repetition_penalty), min_tokens=params.min_tokens,
                logit_bias={t: float(v) for t, v in (params.logit_bias or {}).items()})
            boot = None
            if pd_mode != "null" and bootstrap is not None:
                boot = Bootstrap(bootstrap[0], bootstrap[1] or 0, room_key(bootstrap[2], i))
                if pd_mode == "prefill":  # the prefill leg samples only the first token; the decode goes on
                    sampling = msgspec.structs.replace(sampling, max_tokens=1)
            self._client.send(AddRequest(crid, ids, sampling, time.time(), boot, grammar))
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

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     bootstrap: tuple[str, int | None, int | str] | None = None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        def deliver(item: RequestOutput | BaseException) -> None:
            # RuntimeError: the consumer's event loop is closed, nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(q.put_nowait, item)

        req = self.submit(prompt, params, request_id, sink=deliver, bootstrap=bootstrap)
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

    def refresh_stats(self, timeout_s: float = 5.0, flush_cache: bool = False) -> EngineStats:
        """Ask the core for fresh numbers (waits for its next report); flush_cache: evict every cached prefix
        page no request holds first."""
        if self._dead:
            raise EngineDeadError(self._dead)
        self._stats_event.clear()
        self._client.send(StatsRequest(flush_cache))
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
