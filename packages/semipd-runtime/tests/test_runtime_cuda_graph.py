"""Decode CUDA-graph runner: the padded static-buffer forward (what gets captured) on CPU, eagerly.

Replay itself needs CUDA (benchmarks/gpu_checks.py checks it on the GPU); what can go wrong on the way in —
bucketing, padding rows, stale page-table entries, the static logits buffer — is the same code path here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_fixtures import core_config, eager_decode_graphs, random_model_fixture
from test_runtime_parity_random import assert_pool_clean

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.cuda_graph import DecodeGraphRunner, graph_batch_sizes
from semipd_runtime.messages import AddRequest, CoreSampling


@given(st.integers(1, 1024))
def test_batch_sizes_cover_every_batch(max_bs: int) -> None:
    sizes = graph_batch_sizes(max_bs)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_bs
    for n in range(1, max_bs + 1):  # padding never more than doubles a batch (or adds over 32 rows)
        bs = next(s for s in sizes if s >= n)
        assert bs < 2 * n or bs - n < 32 or bs <= 8


def test_batch_sizes_reject_nonpositive() -> None:
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        graph_batch_sizes(0)


def core_for(path: Path, graphs: bool, **kw: object) -> EngineCore:
    cfg = core_config(path, max_model_len=256, num_pages=kw.pop("num_pages", 200), max_running_requests=12,
                      **kw)
    core = EngineCore(cfg)
    if graphs:
        eager_decode_graphs(core, max_bs=8)
    return core


model_dir = random_model_fixture("graph-model", kind="llama31-untied")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_padded_decode_logits_equal_eager(model_dir: Path, lens: list[int], seed: int) -> None:
    core = core_for(model_dir, graphs=False)
    g = torch.Generator().manual_seed(seed)
    alloc, runner = core.allocator, core.runner
    slots = [alloc.alloc(alloc.pages_needed(n + 1)) for n in lens]
    rows = alloc.req_to_page[torch.tensor(slots)]
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    runner.forward(prompts, [0] * len(lens), rows, [])  # fill the cache with each prompt
    nxt = [[int(torch.randint(3, 256, (1,), generator=g))] for _ in lens]
    k_before = core.kv_pool.k(0).clone()
    want = runner.forward(nxt, lens, rows, list(range(len(lens)))).clone()
    k_eager = core.kv_pool.k(0).clone()
    core.kv_pool.k(0).copy_(k_before)  # undo the decode write, then run the padded path
    graphs = DecodeGraphRunner(runner.model, runner.kv_pool, runner.cos_sin_cache, runner.page_size,
                               rows.shape[1], max_bs=8, replay=False)
    graphs.page_table.random_(0, 50)  # stale rows from "earlier steps" must not matter
    got = graphs.run([t[0] for t in nxt], lens, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # padded rows wrote nothing: every slot the eager decode left alone is bit-for-bit untouched, and the slots
    # it wrote hold the same keys (close, not equal: a GEMM over 8 padded rows may round differently from 3)
    k_padded = core.kv_pool.k(0)
    untouched = k_eager == k_before
    assert torch.equal(k_padded[untouched], k_before[untouched])
    torch.testing.assert_close(k_padded, k_eager, rtol=1e-5, atol=1e-5)
    for s in slots:
        alloc.free(s)


def test_greedy_generation_same_with_graph_path(model_dir: Path) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 30, 12, 3, 21, 9, 15, 2, 5)]

    def run(core: EngineCore) -> list[list[int]]:
        for i, p in enumerate(prompts):
            core.add_request(AddRequest(f"r{i}", p, CoreSampling(temperature=0.0, max_tokens=9, ignore_eos=True)))
        out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        for ev in core.run_until_idle():
            out[ev.rid] += ev.token_ids
        core.allocator.check_integrity()
        assert_pool_clean(core)
        return [out[f"r{i}"] for i in range(len(prompts))]

    eager = run(core_for(model_dir, graphs=False))
    # 10 running > max_bs 8: batches above it fall back to eager, smaller ones take the padded path
    assert run(core_for(model_dir, graphs=True, chunked_prefill_size=16)) == eager


def test_graphs_off_on_cpu_and_flag_validation(model_dir: Path) -> None:
    assert core_for(model_dir, graphs=False).runner.graphs is None  # CPU: nothing to capture
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        core_for(model_dir, graphs=False, cuda_graph_max_bs=0)
    cfg = EngineConfig.from_knobs(model_path="x", device="cpu", dtype="float32", max_model_len=8, eos_token_ids=[],
                     max_running_requests=512)
    assert cfg.scheduler.graph_max_bs() == 256
    cfg.scheduler.disable_cuda_graph = True
    assert cfg.scheduler.graph_max_bs() == 0
