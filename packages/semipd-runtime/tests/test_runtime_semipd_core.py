"""Semi-PD decode core + prefill worker (thread placement, no partition) on small random models, CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from runtime_fixtures import (
    core_config,
    kill_prefill_worker,
    prompts_fixture,
    random_model_fixture,
    shared_pool,
)
from test_runtime_parity_random import assert_pool_clean

from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.messages import AddRequest, CoreSampling


def make_core(path: Path, mode: str, **kw: object) -> EngineCore:
    cfg = core_config(path, max_model_len=256, num_pages=kw.pop("num_pages", 200), mode=mode,
                      prefill_placement="thread", chunked_prefill_size=kw.pop("chunked_prefill_size", 16),
                      max_prefill_tokens=48, **kw)
    return create_core(cfg)


def run(core: EngineCore, prompts: list[list[int]], sampling: CoreSampling) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        core.add_request(AddRequest(f"r{i}", p, sampling))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    reasons = {}
    for _ in range(100_000):
        for ev in core.step():
            out[ev.rid] += ev.token_ids
            if ev.finish_reason:
                reasons[ev.rid] = ev.finish_reason
        if not core.has_work() and not core.pending:
            break
    assert set(reasons) == set(out)
    return out


model_dir = random_model_fixture("llama")
prompts = prompts_fixture(3, (3, 30, 7, 70, 1, 20, 45, 12))


@pytest.mark.parametrize("sampling", [
    CoreSampling(temperature=0.0, max_tokens=10, ignore_eos=True),
    CoreSampling(temperature=0.9, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True),
])
def test_semipd_equals_unified(model_dir: Path, prompts: list[list[int]], sampling: CoreSampling) -> None:
    unified = make_core(model_dir, "unified")
    want = run(unified, prompts, sampling)
    semi = make_core(model_dir, "semi-pd")
    shared_pool(semi)
    try:
        got = run(semi, prompts, sampling)
        assert_pool_clean(semi)
    finally:
        semi.close()
    assert got == want


def test_semipd_random_aborts_keep_pool_clean(model_dir: Path, prompts: list[list[int]]) -> None:
    core = make_core(model_dir, "semi-pd")
    shared_pool(core)
    rng = random.Random(0)
    try:
        for round_ in range(3):
            rids = [f"x{round_}-{i}" for i in range(len(prompts))]
            for rid, p in zip(rids, prompts):
                core.add_request(AddRequest(rid, p, CoreSampling(temperature=0.0, max_tokens=12, ignore_eos=True)))
            finished: set[str] = set()
            aborted_prefilling = 0
            for _step in range(10_000):
                if rng.random() < 0.3:
                    victim = rng.choice(rids)
                    req = core.requests.get(victim)
                    if req is not None and req.status.value == "prefilling":
                        aborted_prefilling += 1
                    core.abort(victim)
                for ev in core.step():
                    if ev.finish_reason:
                        assert ev.rid not in finished, "finished twice"
                        finished.add(ev.rid)
                core.allocator.check_integrity()
                if not core.has_work() and not core.pending:
                    break
            assert finished == set(rids)
            assert_pool_clean(core, evict=False)  # the next round may hit what this one cached
        assert not core.allocator.parked_slots()
        assert_pool_clean(core)
    finally:
        core.close()


def test_dead_prefill_worker_fails_its_requests_and_comes_back(model_dir: Path, prompts: list[list[int]]) -> None:
    core = make_core(model_dir, "semi-pd")
    executor = shared_pool(core)
    executor.max_restarts = 1
    greedy = CoreSampling(temperature=0.0, max_tokens=5, ignore_eos=True)
    try:
        core.add_request(AddRequest("early", prompts[0], CoreSampling(temperature=0.0, max_tokens=30,
                                                                     ignore_eos=True)))
        events = []
        while not any(ev.token_ids for ev in events):
            events += core.step()
        # the worker dies; the batch sent to it next fails (only its requests), then a fresh worker takes over
        kill_prefill_worker(core)
        core.add_request(AddRequest("doomed", prompts[3], greedy))
        events += core.step()
        assert core.requests["doomed"].status.value == "prefilling"
        for i, p in enumerate(prompts[1:4]):
            core.add_request(AddRequest(f"late{i}", p, greedy))
        for _ in range(10_000):
            events += core.step()
            if not core.has_work() and not core.pending:
                break
        by_rid: dict[str, list] = {}
        for ev in events:
            by_rid.setdefault(ev.rid, []).append(ev)
        # the running request keeps decoding to its end; the dead worker's request fails with 503; a fresh worker
        # serves the later ones (same tokens as unified)
        assert by_rid["early"][-1].finish_reason == "length"
        assert sum(len(e.token_ids) for e in by_rid["early"]) == 30
        last = by_rid["doomed"][-1]
        assert last.finish_reason == "abort" and last.status == 503 and not last.token_ids
        unified = make_core(model_dir, "unified")
        want = run(unified, prompts[1:4], greedy)
        for i in range(3):
            assert [t for e in by_rid[f"late{i}"] for t in e.token_ids] == want[f"r{i}"]
        assert core.stats().healthy and executor.restarts == 1 and core.stats().repartitions == 0
        assert_pool_clean(core)
        # a second death, past max_restarts: the executor gives up, waiting requests fail, decoding goes on
        kill_prefill_worker(core)
        core.add_request(AddRequest("after", prompts[2], greedy))
        core.add_request(AddRequest("after2", prompts[1], greedy))
        for _ in range(10_000):
            events += core.step()
            if not core.has_work() and not core.pending:
                break
        assert [ev for ev in events if ev.rid == "after"][-1].status == 503
        assert [ev for ev in events if ev.rid == "after2"][-1].status == 503
        assert not core.stats().healthy
        assert_pool_clean(core)
    finally:
        core.close()


def test_partition_is_made_on_the_instance_gpu(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--base-gpu-id N: the SM partition (green context) is made on cuda:N, where the model is, not on GPU 0."""
    from semipd_runtime import core_factory

    assert [core_factory._device_index(d) for d in ("cuda:1", "cuda:0", "cuda", "cpu")] == [1, 0, 0, 0]
    seen: list[object] = []
    real = core_factory.create_partition

    def spy(*args: object, **kw: object) -> object:
        seen.append(kw.get("device_index"))
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(core_factory, "create_partition", spy)
    core = make_core(model_dir, "semi-pd")
    try:
        assert seen == [0]  # cfg.device is "cpu" here; cuda:N gives N (above)
    finally:
        core.close()
