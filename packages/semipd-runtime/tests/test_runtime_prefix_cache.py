"""Radix prefix cache in the engine cores (tiny random-weight Llama, CPU, fp32): greedy outputs with the cache
on equal the cache-off outputs over hypothesis-generated shared-prefix request sets (waves, so later requests
hit what earlier ones left; next turns, so decode-written pages are reused; tight pools, so eviction and
preemption happen; aborts, so partly written requests are cached), in unified and semi-PD mode; hits really
skip compute; after every run no request holds a page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from runtime_fixtures import core_config, random_model_fixture, shared_pool
from test_runtime_parity_random import assert_pool_clean

from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.llama import LlamaForCausalLM

PAGE = 4


@dataclass(frozen=True)
class Req:
    prompt: list[int]
    max_tokens: int
    abort_after: int | None  # core steps of its wave after which it is aborted (None: runs to its end)
    follows: str | None = None  # a next turn: the prompt goes after that request's prompt and output


model_dir = random_model_fixture("llama-cache", seed=4)  # `model` (conftest) loads it


def make_core(model_dir: Path, model: LlamaForCausalLM, mode: str, cache: bool, **kw: Any) -> EngineCore:
    cfg = core_config(model_dir, max_model_len=128, page_size=PAGE, mode=mode, prefill_placement="thread",
                      enable_radix_cache=cache, max_prefill_tokens=32, **kw)
    return create_core(cfg, model=model)


def run_waves(core: EngineCore, waves: list[list[Req]], aborts: bool = True) -> dict[str, list[int]]:
    """Each wave is added at once and run until idle; returns tokens per request id ('w<wave>-<i>')."""
    out: dict[str, list[int]] = {}
    prompts: dict[str, list[int]] = {}
    for w, wave in enumerate(waves):
        for i, r in enumerate(wave):
            rid = f"w{w}-{i}"
            out[rid] = []
            # a next turn reuses pages holding the earlier request's generated tokens (decode-written K/V)
            prompts[rid] = (prompts[r.follows] + out[r.follows] if r.follows else []) + r.prompt
            sampling = CoreSampling(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
            core.add_request(AddRequest(rid, prompts[rid], sampling))
        for step in range(100_000):
            for i, r in enumerate(wave):
                if aborts and r.abort_after == step:
                    core.abort(f"w{w}-{i}")
            for ev in core.step():
                assert ev.error is None, ev.error
                out[ev.rid] += ev.token_ids
            core.allocator.check_integrity()
            if not core.has_work() and not core.pending:
                break
        assert_pool_clean(core, evict=False)
    return out


def check_against_reference(got: dict[str, list[int]], want: dict[str, list[int]],
                            waves: list[list[Req]]) -> None:
    for w, wave in enumerate(waves):
        for i, r in enumerate(wave):
            rid = f"w{w}-{i}"
            if r.abort_after is None:
                assert got[rid] == want[rid], rid
            else:  # whatever an aborted request emitted is the start of its real continuation
                assert got[rid] == want[rid][: len(got[rid])], rid


def _request_sets() -> st.SearchStrategy[list[list[Req]]]:
    token = st.integers(3, 255)
    prefixes = st.lists(st.lists(token, min_size=6, max_size=22), min_size=1, max_size=3)

    @st.composite
    def waves(draw: Callable[[st.SearchStrategy[Any]], Any]) -> list[list[Req]]:
        pre = draw(prefixes)
        out: list[list[Req]] = []
        finished: list[str] = []  # earlier requests that run to their end: a next turn may follow one
        for w in range(draw(st.integers(2, 3))):
            wave = []
            for _i in range(draw(st.integers(1, 4))):
                abort = draw(st.one_of(st.none(), st.none(), st.integers(0, 6)))
                if finished and draw(st.booleans()):
                    turn = draw(st.lists(token, min_size=1, max_size=5))
                    after = draw(st.sampled_from(finished))
                    wave.append(Req(turn, draw(st.integers(1, 8)), abort, follows=after))
                    continue
                p = draw(st.sampled_from(pre))
                # mostly the whole shared prefix; sometimes a part of it, so matches end inside a cached node
                cut = draw(st.one_of(st.just(len(p)), st.integers(0, len(p))))
                prompt = (p[:cut] + draw(st.lists(token, max_size=6))) or [7]
                wave.append(Req(prompt, draw(st.integers(1, 8)), abort))
            finished += [f"w{w}-{i}" for i, r in enumerate(wave) if r.abort_after is None]
            out.append(wave)
        return out

    return waves()


POOLS = st.sampled_from([
    dict(num_pages=200, chunked_prefill_size=64, max_running_requests=4),
    dict(num_pages=16, chunked_prefill_size=64, max_running_requests=4),  # evict + preempt
    dict(num_pages=40, chunked_prefill_size=5, max_running_requests=2),  # chunked, queued
])
HYP = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYP
@given(waves=_request_sets(), pool=POOLS)
def test_unified_cache_on_equals_off(model_dir: Path, model: LlamaForCausalLM, waves: list[list[Req]],
                                     pool: dict[str, int]) -> None:
    want = run_waves(make_core(model_dir, model, "unified", cache=False, **pool), waves, aborts=False)
    core = make_core(model_dir, model, "unified", cache=True, **pool)
    check_against_reference(run_waves(core, waves), want, waves)
    assert_pool_clean(core)


@settings(HYP, max_examples=6)
@given(waves=_request_sets(), pool=POOLS)
def test_semipd_cache_on_equals_off(model_dir: Path, model: LlamaForCausalLM, waves: list[list[Req]],
                                    pool: dict[str, int]) -> None:
    want = run_waves(make_core(model_dir, model, "unified", cache=False, **pool), waves, aborts=False)
    for cache in (True, False):
        core = make_core(model_dir, model, "semi-pd", cache=cache, **pool)
        try:
            check_against_reference(run_waves(core, waves), want, waves)
            assert_pool_clean(core)
        finally:
            core.close()


def count_tokens(runner: Any) -> list[int]:
    """Wrap runner.forward (still the real one) to record the tokens each call computes."""
    seen: list[int] = []
    real = runner.forward

    def forward(chunks: list[list[int]], *args: Any) -> Any:
        seen.append(sum(map(len, chunks)))
        return real(chunks, *args)

    runner.forward = forward
    return seen


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_hits_skip_compute(model_dir: Path, model: LlamaForCausalLM, mode: str) -> None:
    g = torch.Generator().manual_seed(9)
    system = torch.randint(3, 256, (22,), generator=g).tolist()  # 5 full pages + 2 tokens
    first, second = system + [11, 12, 13], system[:21] + [40, 41]
    outs: dict[bool, list[list[int]]] = {}
    for cache in (False, True):
        core = make_core(model_dir, model, mode, cache=cache, num_pages=64, chunked_prefill_size=64)
        runner = shared_pool(core).router.current.channel.worker.runner if mode == "semi-pd" else core.runner  # type: ignore[attr-defined]
        seen = count_tokens(runner)
        try:
            outs[cache] = []
            computed = []
            for prompt in (first, second):
                before = len(seen)
                out = run_waves(core, [[Req(prompt, 3, None)]])
                outs[cache].append(out["w0-0"])
                # prefill tokens (decode steps compute 1 each, 2 of them for 3 output tokens)
                computed.append(sum(seen[before:]) - (2 if mode == "unified" else 0))
            st_ = core.stats()
            if cache:
                # the second prompt shares 5 full pages (20 tokens) of the first: only 3 tokens are computed
                assert computed == [len(first), len(second) - 20]
                assert st_.prefix_hit_tokens == 20 and st_.prefix_query_tokens == len(first) + len(second)
                assert st_.cached_pages > 0 and st_.cached_pages == st_.evictable_pages
                assert st_.pages_used == 0
            else:
                assert computed == [len(first), len(second)] and st_.prefix_hit_tokens == 0
                assert st_.cached_pages == 0
            assert_pool_clean(core)
        finally:
            core.close()
    assert outs[True] == outs[False]


def test_fully_cached_prompt_still_samples(model_dir: Path, model: LlamaForCausalLM) -> None:
    """The same page-aligned prompt twice: the second computes its last page again (logits to sample)."""
    prompt = list(range(10, 26))  # 4 full pages
    core = make_core(model_dir, model, "unified", cache=True, num_pages=64)
    seen = count_tokens(core.runner)
    a = run_waves(core, [[Req(prompt, 1, None)]])["w0-0"]
    n = len(seen)
    b = run_waves(core, [[Req(prompt, 1, None)]])["w0-0"]
    assert a == b and sum(seen[n:]) == PAGE and core.cache.hit_tokens == 12
    assert_pool_clean(core)


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_live_prefix_is_shared_before_its_request_ends(model_dir: Path, model: LlamaForCausalLM,
                                                        mode: str) -> None:
    """A request arriving while an earlier one with the same new prefix still decodes reuses the prefix (its
    prompt pages were published when the prefill finished), and outputs equal the cache-off run."""
    system = list(range(30, 54))  # 6 pages, new to the cache
    prompts = {"first": system + [5, 6, 7], "later": system + [8, 9]}

    def run(cache: bool) -> tuple[dict[str, list[int]], int]:
        core = make_core(model_dir, model, mode, cache)
        out: dict[str, list[int]] = {"first": [], "later": []}
        try:
            core.add_request(AddRequest("first", prompts["first"],
                                        CoreSampling(temperature=0.0, max_tokens=30, ignore_eos=True)))
            while len(out["first"]) < 3:  # first is decoding: its prefill is done, it has not ended
                for ev in core.step():
                    out[ev.rid] += ev.token_ids
            hits_before = core.stats().prefix_hit_tokens
            core.add_request(AddRequest("later", prompts["later"],
                                        CoreSampling(temperature=0.0, max_tokens=4, ignore_eos=True)))
            while core.has_work() or core.pending:
                for ev in core.step():
                    out[ev.rid] += ev.token_ids
            hit = core.stats().prefix_hit_tokens - hits_before
            assert_pool_clean(core)
            return out, hit
        finally:
            core.close()

    on, hit = run(True)
    off, _ = run(False)
    assert hit == len(system)
    assert on == off


def test_prefill_batch_budget_counts_only_uncached_tokens(model_dir: Path, model: LlamaForCausalLM) -> None:
    """semi-PD batches prompts up to max_prefill_tokens (32 here) of tokens to compute: a long prompt that is
    mostly cached joins the batch instead of waiting for one of its own."""
    core = make_core(model_dir, model, "semi-pd", True)
    greedy = CoreSampling(temperature=0.0, max_tokens=2, ignore_eos=True)
    try:
        prefix = list(range(60, 96))  # 36 tokens = 9 full pages
        core.add_request(AddRequest("warm", prefix + [1], greedy))
        while core.has_work() or core.pending:
            core.step()
        sent = shared_pool(core).next_batch
        core.add_request(AddRequest("short", list(range(100, 108)), greedy))
        core.add_request(AddRequest("cached", prefix + [2, 3, 4, 5], greedy))  # 40 tokens, 4 to compute
        while core.has_work() or core.pending:
            core.step()
        assert shared_pool(core).next_batch - sent == 1, "both went to the prefill worker in one batch"
        assert_pool_clean(core)
    finally:
        core.close()
