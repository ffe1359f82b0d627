"""Startup profiling pass of the SLO policy: a few dummy requests at 2-3 candidate splits, run through the engine's
own path (re-partition, prefill worker, decode steps), so the partitioner starts with step timings at more than
one SM share. The samples are saved as a `LatencyProfile` per model + GPU and reused on the next start."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from semipd_runtime.latency_model import LatencyProfile, profile_cache_path
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.default_model import cache_root
from semipd_runtime.request import RequestStatus

if TYPE_CHECKING:
    from semipd_runtime.core import EngineCore
    from semipd_runtime.shared_pool_prefill import SharedPoolPrefill
    from semipd_runtime.slo_control import SloController

log = logging.getLogger(__name__)
PROFILE_RID = "__slo_profile"


def profile_key(core: EngineCore, partition_kind: str) -> dict[str, str]:
    dev = next(core.model.parameters()).device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"model": f"{Path(core.cfg.model_path).name}-{core.cfg.dtype}", "gpu": f"{gpu}-{partition_kind}"}


def profile_splits(candidates: Sequence[tuple[float, float]], initial: tuple[float, float],
                   n: int) -> list[tuple[float, float]]:
    """`n` splits spread over the candidates (a low and a high prefill share), ending at `initial`."""
    ordered = sorted(candidates)
    quantiles = [] if n < 2 else [0.25] if n == 2 else [0.2 + 0.6 * i / (n - 2) for i in range(n - 1)]
    picks: list[tuple[float, float]] = []
    for q in quantiles:
        s = ordered[round(q * (len(ordered) - 1))]
        if s != initial and s not in picks:
            picks.append(s)
    return picks + [initial]


def seed_from_profile(core: EngineCore, executor: SharedPoolPrefill, ctl: SloController,
                      partition_kind: str) -> None:
    """Seed the partitioner from the cached profile when one matches, else run the pass (and cache it)."""
    settings = ctl.settings
    key = profile_key(core, partition_kind)
    path = None
    if settings.profile_cache_dir != "":
        root = Path(settings.profile_cache_dir) if settings.profile_cache_dir else cache_root() / "profiles"
        path = profile_cache_path(root, key["model"], key["gpu"])
        if path.is_file():
            try:
                profile = LatencyProfile.load(path, expect_key=key)
                ctl.partitioner.seed(profile)
                log.info("slo: latency profile from %s (%d prefill, %d decode steps)", path, len(profile.prefill),
                         len(profile.decode))
                return
            except (ValueError, OSError) as e:
                log.warning("slo: ignoring latency profile %s (%s); profiling again", path, e)
    if settings.profile_splits == 0:
        log.info("slo: no profiling pass (profile_splits=0): the partitioner learns from live steps only")
        return
    t0 = time.perf_counter()
    profile = run_profile(core, executor, ctl, key)
    log.info("slo: profiled %d prefill and %d decode steps at %d splits in %.1fs", len(profile.prefill),
             len(profile.decode), settings.profile_splits, time.perf_counter() - t0)
    if path is not None:
        profile.save(path)
        log.info("slo: latency profile saved to %s", path)


def run_profile(core: EngineCore, executor: SharedPoolPrefill, ctl: SloController,
                key: dict[str, str]) -> LatencyProfile:
    s = ctl.settings
    splits = profile_splits(ctl.partitioner.config.candidates or (), executor.split, s.profile_splits)
    longest = s.profile_prompt_length(core.cfg.max_model_len, core.cfg.scheduler.max_prefill_tokens)
    sampling = CoreSampling(temperature=0.0, max_tokens=s.profile_decode_tokens, ignore_eos=True)
    rng = random.Random(0)
    vocab = core.model.config.vocab_size
    deadline = time.monotonic() + s.profile_timeout_s
    ctl.profiling = True
    n = 0
    try:
        for split in splits:
            core.repartition(*split)
            # each predicate is polled to completion before the loop moves on, so late binding is harmless
            _pump(core, lambda: executor.split == split and not executor.in_transition, deadline)  # noqa: B023
            for i in range(s.profile_requests):
                # one request per prefill batch, of growing length, while the earlier ones decode: varied steps
                rid, n = f"{PROFILE_RID}-{n}", n + 1
                length = max(1, longest * (i + 1) // s.profile_requests)
                core.add_request(AddRequest(rid, [rng.randrange(vocab) for _ in range(length)], sampling))
                _pump(core, lambda: rid not in core.requests or core.requests[rid].status not in (  # noqa: B023
                    RequestStatus.WAITING, RequestStatus.PREFILLING), deadline)
            _pump(core, lambda: not core.has_work() and not core.pending, deadline)
    finally:
        ctl.profiling = False
    if executor.error:
        raise RuntimeError(f"slo profiling failed: {executor.error}")
    executor.router.repartitions = 0  # count only the splits taken while serving
    return ctl.partitioner.export_profile(key)


def _pump(core: EngineCore, done: Callable[[], bool], deadline: float) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("slo profiling pass did not finish in time (raise profile_timeout_s or lower "
                               "profile_requests / profile_prompt_tokens)")
        core.step()  # events of the dummy requests go nowhere: nothing else runs before the core is ready
        if not core.has_work():
            time.sleep(0.002)
