"""Overlap scheduling (step N+1 launched before step N is resolved), CPU: the same tokens, finish reasons and
logprobs as resolving every step before the next, in unified and semi-PD mode, with stop tokens and EOS
mid-batch, max_tokens 1, aborts mid-stream, preemption in a tiny pool and the CUDA-graph input path; pages of
a request in a step in flight come back only when that step resolves; the pool is clean after every run.

On CPU a launch computes everything at once, so the asynchrony itself is not exercised here; what is, is all
the bookkeeping around it (placeholders, discarded rows, deferred releases, scheduling predicates)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from runtime_fixtures import (
    core_config,
    eager_decode_graphs,
    prompts_fixture,
    random_model_fixture,
    shared_pool,
)
from test_runtime_parity_random import assert_pool_clean

from semipd_memory import PageAllocator, RadixCache
from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.forward_batch import fill_placeholders
from semipd_runtime.messages import AddRequest, CoreSampling, TokenLogprobMsg
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.request import Request, RequestStatus
from semipd_runtime.scheduler import ScheduledBatch, Scheduler, step_writer

PAGE = 4
GREEDY = CoreSampling(temperature=0.0, max_tokens=12, ignore_eos=True)

model_dir = random_model_fixture("llama-overlap", seed=2)  # `model` (conftest) loads it
prompts = prompts_fixture(5, (3, 30, 7, 50, 1, 20, 13, 9))


def make_core(model_dir: Path, model: LlamaForCausalLM, mode: str, overlap: bool, graphs: bool = False,
              **kw: Any) -> EngineCore:
    cfg = core_config(model_dir, max_model_len=kw.pop("ctx", 128), eos_token_ids=kw.pop("eos", []),
                      num_pages=kw.pop("num_pages", 200), page_size=PAGE, mode=mode,
                      prefill_placement="thread", chunked_prefill_size=kw.pop("chunked_prefill_size", 16),
                      max_prefill_tokens=32, disable_overlap_schedule=not overlap, **kw)
    core = create_core(cfg, model=model)
    if graphs:
        eager_decode_graphs(core, max_bs=4)
    return core


@dataclass
class Result:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobMsg]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    steps: int = 0


def run(core: EngineCore, reqs: list[tuple[str, list[int], CoreSampling]],
        abort_at: dict[str, int] | None = None) -> Result:
    """Add all, step until idle (aborting rid at step abort_at[rid]); every request ends exactly once and
    nothing is emitted for it afterwards; no page is held at the end."""
    res = Result()
    for rid, prompt, sampling in reqs:
        core.add_request(AddRequest(rid, prompt, sampling))
        res.requests.append(core.requests[rid])
        res.tokens[rid], res.logprobs[rid] = [], []
    try:
        for step in range(10_000):
            for rid, at in (abort_at or {}).items():
                if at == step:
                    core.abort(rid)
            for ev in core.step():
                assert ev.rid not in res.reasons, f"event for {ev.rid} after it ended: {ev}"
                assert ev.error is None, ev.error
                res.tokens[ev.rid] += ev.token_ids
                res.logprobs[ev.rid] += ev.logprobs or []
                if ev.finish_reason:
                    res.reasons[ev.rid] = ev.finish_reason
            core.allocator.check_integrity()
            if not core.has_work() and not core.pending:
                break
        res.steps = core.num_steps
        assert set(res.reasons) == set(res.tokens)
        assert core.inflight is None and not core.allocator.parked_slots()
        assert_pool_clean(core, evict=False)
    finally:
        core.close()
    return res


def count_placeholders(core: EngineCore) -> list[int]:
    """Wrap the decode runner's forward: per call that had any, how many input ids were placeholders."""
    seen: list[int] = []
    real = core.runner.forward

    def forward(chunks: list[list[int]], *args: Any, **kw: Any) -> Any:
        n = sum(t < 0 for c in chunks for t in c)
        if n:
            assert kw.get("prev_tokens", args[3] if len(args) > 3 else None) is not None
            seen.append(n)
        return real(chunks, *args, **kw)

    core.runner.forward = forward  # type: ignore[method-assign]
    return seen


def assert_same(got: Result, want: Result) -> None:
    assert got.tokens == want.tokens
    assert got.reasons == want.reasons
    for rid, lps in want.logprobs.items():
        assert len(got.logprobs[rid]) == len(lps), rid
        for a, b in zip(got.logprobs[rid], lps):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top], rid
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def mixed_requests(model_dir: Path, model: LlamaForCausalLM,
                   prompts: list[list[int]]) -> tuple[list[tuple[str, list[int], CoreSampling]], int]:
    """Requests that end in every way, at different steps of one batch: stop tokens and EOS mid-stream (picked
    from a first greedy run), max_tokens 1, seeded sampling, logprobs. Returns them and the EOS id."""
    free = run(make_core(model_dir, model, "unified", overlap=False),
               [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    outs = [free.tokens[f"r{i}"] for i in range(len(prompts))]
    eos = outs[0][3]
    reqs = []
    for i, p in enumerate(prompts):
        kind = i % 4
        if kind == 0:  # stops on its (i // 4 + 2)-th token, or earlier if that id came before
            s = CoreSampling(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[outs[i][i // 4 + 2]])
        elif kind == 1:
            s = CoreSampling(temperature=0.0, max_tokens=1 + i // 4, ignore_eos=True, logprobs=3)
        elif kind == 2:
            s = CoreSampling(temperature=0.8, top_p=0.9, top_k=40, seed=100 + i, max_tokens=10, ignore_eos=True,
                             logprobs=0)
        else:  # EOS (the core's eos set) counts for this one only
            s = CoreSampling(temperature=0.0, max_tokens=12, ignore_eos=False)
        reqs.append((f"r{i}", p, s))
    return reqs, eos


@pytest.mark.parametrize("mode,graphs", [("unified", False), ("unified", True), ("semi-pd", False)])
def test_overlap_equals_plain(model_dir: Path, model: LlamaForCausalLM, prompts: list[list[int]], mode: str,
                              graphs: bool) -> None:
    reqs, eos = mixed_requests(model_dir, model, prompts)
    want = run(make_core(model_dir, model, mode, overlap=False, graphs=graphs, eos=[eos]), reqs)
    core = make_core(model_dir, model, mode, overlap=True, graphs=graphs, eos=[eos])
    placeholders = count_placeholders(core)
    got = run(core, reqs)
    assert_same(got, want)
    # the inputs of most steps came from the step still in flight
    assert len(placeholders) >= got.steps // 2, (len(placeholders), got.steps, want.steps)
    # the set really ends in every way, and a stop ends the output at the stop token
    assert set(want.reasons.values()) == {"stop", "length"}
    assert len(want.tokens["r1"]) == 1  # max_tokens 1
    for rid, _, s in reqs:
        if s.stop_token_ids:
            assert want.reasons[rid] == "stop" and want.tokens[rid][-1] == s.stop_token_ids[0]
            assert s.stop_token_ids[0] not in want.tokens[rid][:-1]
    assert all(len(lp) == len(want.tokens[rid]) for rid, lp in want.logprobs.items() if lp)


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_overlap_greedy_and_seeded_equal_unified_reference(model_dir: Path, model: LlamaForCausalLM,
                                                           prompts: list[list[int]], mode: str) -> None:
    for sampling in (GREEDY, CoreSampling(temperature=1.0, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)):
        reqs = [(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
        want = run(make_core(model_dir, model, "unified", overlap=False), reqs)
        assert_same(run(make_core(model_dir, model, mode, overlap=True), reqs), want)


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_overlap_aborts_mid_stream(model_dir: Path, model: LlamaForCausalLM, prompts: list[list[int]],
                                   mode: str) -> None:
    reqs = [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    want = run(make_core(model_dir, model, "unified", overlap=False), reqs)
    rng = random.Random(1)
    for _ in range(3):
        abort_at = {f"r{i}": rng.randrange(0, 14) for i in rng.sample(range(len(prompts)), 4)}
        got = run(make_core(model_dir, model, mode, overlap=True), reqs, abort_at)
        for rid in want.tokens:
            if got.reasons[rid] == "abort":
                assert rid in abort_at
                assert got.tokens[rid] == want.tokens[rid][: len(got.tokens[rid])], rid
            else:
                assert got.tokens[rid] == want.tokens[rid], rid
        assert "abort" in got.reasons.values()


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_overlap_preemption_in_a_tiny_pool(model_dir: Path, model: LlamaForCausalLM, prompts: list[list[int]],
                                           mode: str) -> None:
    reqs = [(f"r{i}", p, CoreSampling(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[9]))
            for i, p in enumerate(prompts)]
    want = run(make_core(model_dir, model, "unified", overlap=False), reqs)
    # 22 pages of 4 tokens cannot hold all the requests at once: decode must preempt and recompute
    tight = dict(num_pages=22, max_running_requests=8, chunked_prefill_size=64)
    for cache in (True, False):
        got = run(make_core(model_dir, model, mode, overlap=True, enable_radix_cache=cache, **tight), reqs)
        assert got.tokens == want.tokens and got.reasons == want.reasons
        assert sum(r.num_preemptions for r in got.requests) > 0


def test_release_waits_for_the_step_in_flight(model_dir: Path, model: LlamaForCausalLM,
                                              prompts: list[list[int]]) -> None:
    """Aborted and stopped requests keep their pages until the step that still writes them resolves."""
    core = make_core(model_dir, model, "unified", overlap=True)
    a = core.allocator
    try:
        for rid, p in (("a", prompts[3]), ("b", prompts[1])):
            core.add_request(AddRequest(rid, p, CoreSampling(temperature=0.0, max_tokens=40, ignore_eos=True)))
        req = core.requests["a"]
        while not (req.status is RequestStatus.RUNNING and req.num_uncomputed == 1 and core.inflight is not None
                   and req.last_step == core.inflight.step):
            core.step()
        assert core.has_work() and req.has_placeholder
        slot, pages = req.slot, a.pages(req.slot)
        assert slot is not None
        held = a.num_used_pages
        core.abort("a")
        assert core.pending[-1].finish_reason == "abort"
        # still held (parked under the step's writer name): the step in flight writes a's K/V
        assert a.parked_slots() == {slot: step_writer(core.inflight.step)} and a.num_used_pages == held  # type: ignore[union-attr]
        own = len(pages) - a.num_shared(slot)  # its prompt's full pages were published (shared) at prefill end
        assert list(a.parked_slots()) == [slot] and a.num_parked_pages == own
        a.check_integrity()
        events = core.step()  # launches the next step (without a), resolves the one a was in: released
        assert [e.rid for e in events if e.rid == "a"] == ["a"] and events[0].finish_reason == "abort"
        assert slot not in a.live_slots() and not a.parked_slots()
        assert a.num_used_pages == held - len(pages)
        # a stop token sampled at step N: b was already in N+1, so its pages wait for N+1's resolve
        b = core.requests["b"]
        b.sampling = CoreSampling(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=list(range(256)))
        events = core.step()
        assert [(e.rid, e.finish_reason) for e in events] == [("b", "stop")]
        assert b.status is RequestStatus.FINISHED and not b.has_placeholder
        assert a.parked_slots() and b.last_step == core.inflight.step  # type: ignore[union-attr]
        assert core.step() == [] and not a.parked_slots() and not core.has_work()
        assert_pool_clean(core)
    finally:
        core.close()


# --- the bookkeeping, directly --------------------------------------------------------------------------------
def _sched(num_pages: int) -> tuple[PageAllocator, Scheduler]:
    a = PageAllocator(num_pages, PAGE, 4, 8)
    return a, Scheduler(a, max_running_requests=4, chunked_prefill_size=64, cache=RadixCache(a))


def _launch(s: Scheduler, reqs: list[Request]) -> int:
    """What EngineCore.launch does to the requests of a scheduled batch (every one samples)."""
    batch = s.schedule()
    assert batch is not None and batch.requests == reqs
    for r, n in zip(batch.requests, batch.num_new_tokens):
        r.num_computed += n
        r.output_ids.append(-1)
    return s.launched(batch)


def _resolve(s: Scheduler, step: int, reqs: list[Request], tok: int = 5) -> None:
    s.resolved(step)
    for r in reqs:
        r.output_ids[-1] = tok


def test_deferred_release_bookkeeping() -> None:
    a, s = _sched(8)
    r = Request("a", list(range(10, 16)), CoreSampling(max_tokens=8))
    s.add(r)
    step = _launch(s, [r])  # 6 prompt tokens: 2 pages
    assert r.last_step == step == 1 and s.in_flight
    s.finish(r, "abort")
    assert r.slot is None and a.parked_slots() == {0: step_writer(step)} and a.num_free_pages == 6
    assert a.num_parked_pages == 2
    a.check_integrity()
    with pytest.raises(AssertionError):
        s.resolved(2)  # steps resolve in order, and only launched ones
    s.resolved(step)
    assert not a.parked_slots() and a.num_parked_pages == 0 and not a.live_slots() and not s.in_flight
    # its first full page (written, tokens known) went to the prefix cache; the partial one is free
    assert a.num_cached_pages == 1 and a.num_free_pages == 7
    a.check_integrity()
    # nothing in flight for it: released at once
    r2 = Request("b", list(range(40, 46)), CoreSampling(max_tokens=8))
    s.add(r2)
    _resolve(s, _launch(s, [r2]), [r2])
    s.finish(r2, "length")
    assert not a.parked_slots() and not a.live_slots()
    a.check_integrity()


def test_release_refuses_unknown_tokens() -> None:
    _, s = _sched(8)
    r = Request("a", [3, 4, 5], CoreSampling(max_tokens=8))
    s.add(r)
    _launch(s, [r])
    r.num_computed += 1  # as if its in-flight token had been fed to the device: the cache can't key it
    with pytest.raises(AssertionError, match="tokens are known"):
        s.finish(r, "abort")


def test_growing_waits_for_pages_in_flight_instead_of_preempting_more() -> None:
    a, s = _sched(4)  # 4 pages of 4 tokens
    r = Request("r", list(range(10, 18)), CoreSampling(max_tokens=8))  # 8 tokens: 2 pages, the 9th needs a 3rd
    v = Request("v", list(range(30, 37)), CoreSampling(max_tokens=8))  # 7 tokens: 2 pages, room for the 8th
    s.add(r)
    s.add(v)
    _resolve(s, _launch(s, [r, v]), [r, v])
    assert a.num_free_pages == 0
    # a step in flight with v alone (r sat it out)
    v.num_computed += 1
    v.output_ids.append(-1)
    step = s.launched(ScheduledBatch([v], [1]))
    # r needs a page: v is preempted, but its pages come back only when `step` resolves; r waits for them
    # rather than being preempted too
    assert s.schedule() is None
    assert r.status is RequestStatus.RUNNING and s.running == [r] and r.num_preemptions == 0
    assert v.status is RequestStatus.WAITING and v.num_preemptions == 1 and a.num_parked_pages == 2
    a.check_integrity()
    _resolve(s, step, [v])
    batch = s.schedule()
    assert batch is not None and batch.requests[0] is r and len(a.pages(r.slot)) == 3  # type: ignore[arg-type]
    a.check_integrity()


def test_placeholders_are_read_on_the_device(model_dir: Path, model: LlamaForCausalLM) -> None:
    """Negative ids (-1 - row) take the previous step's sampled token of that row, in the packed inputs of a
    mixed step and in the static buffer of the graph path."""
    core = make_core(model_dir, model, "unified", overlap=True, graphs=True)
    prev = torch.tensor([17, 99, 42])
    ids = torch.tensor([5, -3, 7, -1, -2])
    assert fill_placeholders(ids, prev).tolist() == [5, 42, 7, 17, 99]
    a, runner = core.allocator, core.runner
    lens = [6, 9]
    slots = [a.alloc(a.pages_needed(n + 1)) for n in lens]
    rows = a.req_to_page[torch.tensor(slots)]
    g = torch.Generator().manual_seed(0)
    runner.forward([torch.randint(3, 256, (n,), generator=g).tolist() for n in lens], [0, 0], rows, [])
    for use_graphs in (False, True):  # a decode batch goes through the graph runner when it has one
        graphs, runner.graphs = runner.graphs, runner.graphs if use_graphs else None
        want = runner.forward([[42], [17]], lens, rows, [0, 1]).clone()
        got = runner.forward([[-3], [-1]], lens, rows, [0, 1], prev_tokens=prev).clone()
        mixed_want = runner.forward([[42], [3, 4, 17]], [lens[0], 0], rows, [0, 1]).clone()
        mixed = runner.forward([[-3], [3, 4, -1]], [lens[0], 0], rows, [0, 1], prev_tokens=prev)
        runner.graphs = graphs
        assert torch.equal(got, want) and torch.equal(mixed, mixed_want)
    for slot in slots:
        assert slot is not None
        a.free(slot)
    core.close()


class DecodeRecorder:
    """An observer of the core recording its decode-step observations (the others are no-ops)."""

    def __init__(self) -> None:
        self.decode: list[tuple[int, int, float, float]] = []

    def on_decode_step(self, batch: int, context: int, share: float, seconds: float) -> None:
        self.decode.append((batch, context, share, seconds))

    def after_step(self, scheduler: Scheduler, now: float) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: None


def test_semipd_decode_timing_counts_each_step_once(model_dir: Path, model: LlamaForCausalLM,
                                                   prompts: list[list[int]]) -> None:
    core = make_core(model_dir, model, "semi-pd", overlap=True)
    shared_pool(core)
    rec = DecodeRecorder()
    core.observers = [rec]  # type: ignore[list-item]
    t0 = time.perf_counter()
    res = run(core, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    assert len(rec.decode) == res.steps > 0
    # the steps' own times (from when the step before was done) never overlap: their sum fits in the run
    assert all(sec >= 0 for *_, sec in rec.decode) and sum(sec for *_, sec in rec.decode) <= wall
    assert sum(b for b, *_ in rec.decode) == sum(len(t) - 1 for t in res.tokens.values())
    assert all(share == 0.5 for _, _, share, _ in rec.decode)


# --- on the GPU (skipped without one) ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_core(model_dir: Path, mode: str, overlap: bool, **kw: Any) -> EngineCore:
    cfg = core_config(model_dir, device="cuda", max_model_len=128, eos_token_ids=kw.pop("eos", []),
                      num_pages=kw.pop("num_pages", 200), page_size=PAGE, mode=mode,
                      prefill_placement="thread", chunked_prefill_size=16, max_prefill_tokens=32,
                      max_running_requests=12, cuda_graph_max_bs=4, disable_overlap_schedule=not overlap, **kw)
    return create_core(cfg)


def strict(fn: Any) -> Any:
    """fn with every synchronizing CUDA call an error (pageable copies, stream syncs, .item(), .tolist())."""
    def wrapped(*args: Any, **kw: Any) -> Any:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return wrapped


@cuda
def test_cuda_overlap_equals_plain_without_syncs(model_dir: Path, model: LlamaForCausalLM,
                                                 prompts: list[list[int]]) -> None:
    """Real CUDA graphs (batches up to 4) and eager decode (above); scheduling and launching never wait for the
    device, only the read-back of sampled tokens does."""
    reqs, eos = mixed_requests(model_dir, model, prompts)
    reqs += [(f"g{i}", p, CoreSampling(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[9]))
             for i, p in enumerate(prompts)]
    want = run(cuda_core(model_dir, "unified", overlap=False, eos=[eos]), reqs)
    core = cuda_core(model_dir, "unified", overlap=True, eos=[eos])
    core.close = lambda: None  # type: ignore[method-assign]  # run() closes it: twice here
    run(core, [("warm-" + rid, p, s) for rid, p, s in reqs])  # compiles (Triton's first launch of a shape syncs)
    core.launch, core.scheduler.schedule = strict(core.launch), strict(core.scheduler.schedule)  # type: ignore[method-assign]
    assert_same(run(core, reqs), want)
    tight = run(cuda_core(model_dir, "unified", overlap=True, num_pages=30, eos=[eos]), reqs)
    assert tight.tokens == want.tokens and sum(r.num_preemptions for r in tight.requests) > 0


@cuda
def test_cuda_semipd_overlap_equals_plain(model_dir: Path, model: LlamaForCausalLM,
                                          prompts: list[list[int]]) -> None:
    reqs, eos = mixed_requests(model_dir, model, prompts)
    want = run(cuda_core(model_dir, "unified", overlap=False, eos=[eos]), reqs)
    for overlap in (False, True):
        assert_same(run(cuda_core(model_dir, "semi-pd", overlap=overlap, eos=[eos]), reqs), want)
    got = run(cuda_core(model_dir, "semi-pd", overlap=True, eos=[eos]), reqs, {"r2": 3, "r6": 5, "r7": 0})
    assert {rid for rid, why in got.reasons.items() if why == "abort"} <= {"r2", "r6", "r7"}
