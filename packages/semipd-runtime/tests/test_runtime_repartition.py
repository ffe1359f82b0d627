"""Re-partition between steps on a small random model (CPU, `none` backend): a forced move to a new SM split
during a stream of requests loses and duplicates nothing, with the prefill worker as a process and as a thread;
the SLO policy observes steps and decides."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from runtime_fixtures import (
    core_config,
    eager_decode_graphs,
    prompts_fixture,
    random_model_fixture,
    shared_pool,
    slo_controller,
)
from test_runtime_parity_random import assert_pool_clean

from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.latency_model import LatencyProfile
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.partition import SmPartition
from semipd_runtime.shared_pool_prefill import SharedPoolPrefill
from semipd_runtime.slo_control import SloSettings

GREEDY = CoreSampling(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_core(path: Path, mode: str, placement: str = "thread", **kw: object) -> EngineCore:
    cfg = core_config(path, max_model_len=256, num_pages=200, mode=mode, prefill_placement=placement,
                      chunked_prefill_size=16, max_prefill_tokens=16, **kw)  # small batches: several per move
    return create_core(cfg)


model_dir = random_model_fixture("llama")
prompts = prompts_fixture(7, (5, 40, 9, 70, 2, 25, 48, 13, 33, 60, 4, 17))


def standby_ready_queued(core: EngineCore) -> bool:
    """The standby worker has sent its ready message (the next poll switches to it)."""
    ch = shared_pool(core).router.standby.channel if shared_pool(core).router.standby is not None else None
    if ch is None:
        return False
    return ch.chan.pending() if hasattr(ch, "chan") else not ch.outbox.empty()  # type: ignore[attr-defined]


def stream(core: EngineCore, prompts: list[list[int]], moves: dict[int, list[tuple[float, float]]] | None = None,
           abort_rate: float = 0.0, hold: int = 0,
           timeout_s: float = 120.0) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Requests arrive two per step; `moves[step]` forces a re-partition at that step. Returns tokens and finish
    reasons per request, asserting each request finishes exactly once and the pool stays consistent. The last
    `hold` requests wait while a standby worker starts; the moment it reports ready they arrive and are
    dispatched to the old worker, so the switch leaves batches in flight there (and the new worker serves the
    rest)."""
    rng = random.Random(0)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    reasons: dict[str, str] = {}
    step, added = 0, 0
    held = [bool(hold)]  # while the held requests wait, the router leaves a ready standby's message queued: a
    if hold:  # step could otherwise take it (and switch) between our look at the queue and our dispatch
        router = shared_pool(core).router
        take_standby = router._poll_standby
        router._poll_standby = lambda msgs: None if held[0] else take_standby(msgs)  # type: ignore[method-assign]
    deadline = time.monotonic() + timeout_s
    while added < len(prompts) or core.has_work() or core.pending or (
            isinstance(core.executor, SharedPoolPrefill)
            and (shared_pool(core).router.in_transition or shared_pool(core).router.retiring)):
        assert time.monotonic() < deadline, "stream did not finish"
        busy = isinstance(core.executor, SharedPoolPrefill) and shared_pool(core).router.in_transition
        if hold and added >= len(prompts) - hold and busy and standby_ready_queued(core):  # type: ignore[arg-type]
            while added < len(prompts):
                core.add_request(AddRequest(f"r{added}", prompts[added], GREEDY))
                added += 1
            core._dispatch_prefill()  # to the old worker: the switch is next poll
            held[0] = False
        for _ in range(2):
            if added < len(prompts) and (added < len(prompts) - hold or not busy):
                core.add_request(AddRequest(f"r{added}", prompts[added], GREEDY))
                added += 1
        for split in (moves or {}).get(step, []):
            shared_pool(core)
            core.repartition(*split)
        if abort_rate and rng.random() < abort_rate:
            core.abort(f"r{rng.randrange(added)}")
        for ev in core.step():
            out[ev.rid] += ev.token_ids
            if ev.finish_reason:
                assert ev.rid not in reasons, f"{ev.rid} finished twice"
                reasons[ev.rid] = ev.finish_reason
        if isinstance(core.executor, SharedPoolPrefill):
            core.allocator.check_integrity()
        step += 1
        if not core.has_work():
            time.sleep(0.002)  # waiting for a standby worker: don't spin
    assert set(reasons) == set(out), "every request finishes"
    return out, reasons


@pytest.fixture(scope="module")
def unified_out(model_dir: Path, prompts: list[list[int]]) -> dict[str, list[int]]:
    return stream(make_core(model_dir, "unified"), prompts)[0]


# a process standby takes seconds to start on CPU: one move there; threads also cover a move asked for while
# another standby is starting (it waits its turn) and a later one
MOVES = {"process": {2: [(40.0, 60.0)]}, "thread": {2: [(25.0, 75.0), (75.0, 25.0)], 9: [(40.0, 60.0)]}}


# process: spawns and replaces real prefill processes (tens of seconds on CPU); thread covers the same logic
@pytest.mark.parametrize("placement", [pytest.param("process", marks=pytest.mark.slow), "thread"])
def test_forced_repartition_loses_and_duplicates_nothing(model_dir: Path, prompts: list[list[int]],
                                                         unified_out: dict[str, list[int]], placement: str) -> None:
    core = make_core(model_dir, "semi-pd", placement)
    shared_pool(core)
    router = shared_pool(core).router
    first = router.current
    try:
        out, reasons = stream(core, prompts, moves=MOVES[placement], hold=4)
        assert out == unified_out
        assert set(reasons.values()) == {"length"}
        core.allocator.check_integrity()
        assert not core.allocator.parked_slots()
        assert_pool_clean(core)
        stats = core.stats()
        assert router.split == (40.0, 60.0) == (stats.prefill_sm_percent, stats.decode_sm_percent)
        assert stats.repartitions == router.repartitions == (1 if placement == "process" else 3)
        assert router.switches_in_flight >= 1  # the old worker finished batches it held at the switch
        assert not router.retiring and router.standby is None
        assert sum(g.sent for g in router.history) == shared_pool(core).next_batch
        assert first.sent > 0 and router.history[-1].sent > 0  # both the old and the new worker served
        assert first.closed
        if placement == "process":
            proc = first.channel.proc  # type: ignore[attr-defined]
            assert not proc.is_alive() and proc.exitcode == 0, "old prefill process exits cleanly"
            assert shared_pool(core).ready.pid == router.current.channel.proc.pid  # type: ignore[attr-defined]
        else:
            assert not first.channel.thread.is_alive()  # type: ignore[attr-defined]
    finally:
        core.close()
    for gen in router.history:
        if placement == "process":
            assert not gen.channel.proc.is_alive()  # type: ignore[attr-defined]


def test_repartition_with_aborts_and_batches_in_flight(model_dir: Path, prompts: list[list[int]]) -> None:
    """Aborts while batches sit on an old worker: their pages wait for that worker (its own writer name)."""
    core = make_core(model_dir, "semi-pd", "thread")
    shared_pool(core)
    try:
        moves = {s: [((25.0, 75.0), (75.0, 25.0))[s % 2]] for s in range(1, 40, 3)}
        _, reasons = stream(core, prompts * 2, moves=moves, abort_rate=0.3)
        assert "abort" in reasons.values()
        assert shared_pool(core).router.repartitions >= 5 and shared_pool(core).router.switches_in_flight >= 1
        core.allocator.check_integrity()
        assert not core.allocator.parked_slots()
        assert_pool_clean(core)
    finally:
        core.close()


def test_repartition_to_current_split_is_a_no_op(model_dir: Path) -> None:
    core = make_core(model_dir, "semi-pd", "thread")
    shared_pool(core)
    try:
        assert shared_pool(core).router.split == (50.0, 50.0)
        assert core.repartition(50, 50) is False
        core.step()
        assert shared_pool(core).router.repartitions == 0 and len(shared_pool(core).router.history) == 1
    finally:
        core.close()


def slo_settings(tmp_path: Path, **kw: object) -> SloSettings:
    base = dict(partition_policy="slo", slo_ttft_ms=200.0, slo_tpot_ms=20.0, repartition_interval_s=0.05,
                min_dwell_s=0.0, hysteresis=0.0, profile_splits=2, profile_requests=4, profile_prompt_tokens=32,
                profile_decode_tokens=4, profile_cache_dir=str(tmp_path))
    return SloSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_slo_policy_profiles_observes_and_decides(model_dir: Path, prompts: list[list[int]],
                                                  unified_out: dict[str, list[int]], tmp_path: Path) -> None:
    core = make_core(model_dir, "semi-pd", "thread", slo=slo_settings(tmp_path))
    slo = slo_controller(core)
    assert slo is not None
    try:
        (path,) = tmp_path.glob("slo_profile--*.json")
        profile = LatencyProfile.load(path)
        assert len({s.sm_share for s in profile.prefill}) == 2 and len(profile.prefill) >= 8
        assert len({s.sm_share for s in profile.decode}) == 2
        assert slo.partitioner.warmup_reason() is None  # the profile makes it ready to decide at once
        assert shared_pool(core).router.repartitions == 0 and shared_pool(core).router.split == slo.split
        assert_pool_clean(core)
        seen = slo.observations
        out, _ = stream(core, prompts * 3)
        stats = core.stats()
        assert out == {**unified_out, **{k: v for k, v in out.items() if k not in unified_out}}
        assert stats.partition_policy == "slo" and stats.slo_decisions >= 1
        assert stats.slo_observations > seen
        # the finished requests' output lengths reached the partitioner (decode-slot time, bounded by the
        # arrivals' max_tokens), and it plans with the engine's batch cap and cheap moves (a prefill thread)
        planned = slo.partitioner.load_state(time.monotonic()).mean_output_tokens
        assert 0 < planned <= sum(map(len, out.values())) / len(out) + 1e-9
        assert slo.partitioner.config.max_decode_batch == core.cfg.scheduler.max_running_requests
        assert slo.partitioner.config.cheap_moves
        assert stats.predicted_ttft_s > 0 and stats.predicted_tpot_s > 0 and stats.measured_tpot_s > 0
        assert stats.repartitions == shared_pool(core).router.repartitions  # whatever it chose, the core followed
        assert (stats.prefill_sm_percent, stats.decode_sm_percent) == slo.split
    finally:
        core.close()
    # the next start reuses the cached profile: no profiling pass (no re-partition, no dummy steps)
    again = make_core(model_dir, "semi-pd", "thread", slo=slo_settings(tmp_path))
    slo_again = slo_controller(again)
    assert slo_again is not None
    try:
        assert len(shared_pool(again).router.history) == 1 and again.num_steps == 0
        assert slo_again.partitioner.warmup_reason() is None
    finally:
        again.close()


def test_static_policy_never_moves(model_dir: Path, prompts: list[list[int]], tmp_path: Path) -> None:
    core = make_core(model_dir, "semi-pd", "thread", slo=SloSettings(partition_policy="static"))
    shared_pool(core)
    try:
        assert slo_controller(core) is None and not core.observers  # static: no controller watches
        stream(core, prompts)
        assert core.stats().repartitions == 0 and core.stats().partition_policy == "static"
    finally:
        core.close()


@pytest.mark.parametrize("kw, name", [
    (dict(partition_policy="fast"), "partition_policy"), (dict(slo_ttft_ms=0), "slo_ttft_ms"),
    (dict(slo_tpot_ms=float("nan")), "slo_tpot_ms"), (dict(repartition_interval_s=-1), "repartition_interval_s"),
    (dict(profile_requests=0), "profile_requests"),
])
def test_slo_settings_errors_name_the_argument(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SloSettings(**kw)


class KeyedPartition(SmPartition):
    """No confinement, but each split's decode 'runs on its own stream' (as green contexts do): a fresh key."""

    keys = iter(range(1000, 10**6))

    def __init__(self, prefill_percent: float, decode_percent: float) -> None:
        super().__init__(prefill_percent, decode_percent)
        self.key = next(self.keys)

    def stream_key(self, role: str) -> int | None:
        return self.key


def test_retired_split_drops_its_decode_graphs(model_dir: Path, prompts: list[list[int]],
                                               unified_out: dict[str, list[int]]) -> None:
    cfg = core_config(model_dir, max_model_len=256, num_pages=200, mode="semi-pd", prefill_placement="thread",
                      chunked_prefill_size=16, max_prefill_tokens=48)
    core = create_core(cfg, partition=KeyedPartition(50, 50))
    shared_pool(core)
    r = core.runner
    eager_decode_graphs(core, max_bs=8)
    first = shared_pool(core).router.current.partition
    assert isinstance(first, KeyedPartition)
    r.graphs.graphs[(first.key, 4)] = r.graphs.graphs[(first.key, 8)] = object()  # as if captured there
    r.graphs.graphs[(7, 4)] = kept = object()  # another stream's graph
    try:
        out, _ = stream(core, prompts, moves={2: [(25.0, 75.0)]})
        assert out == unified_out
        assert shared_pool(core).router.current.partition is not first and not shared_pool(core).router.retiring
        assert r.graphs.graphs == {(7, 4): kept}  # the retired split's graphs went with it, nothing else
    finally:
        core.close()
