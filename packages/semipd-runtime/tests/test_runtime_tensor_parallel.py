"""Tensor parallelism end to end on CPU (gloo, real rank processes): TP=2 and TP=3 decode the same greedy
tokens as TP=1, in unified and semi-PD mode, and a rank that dies fails the engine in bounded time and turns
its health check red."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from runtime_fixtures import prompts_fixture
from test_runtime_parity_random import assert_pool_clean, run_core

from semipd_runtime import Engine, SamplingParams
from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.errors import EngineDeadError
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.default_model import default_model_path

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # real rank processes (spawn, torch import, gloo)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# every rank keeps the same penalty counts (rank 0 broadcasts each sampling call's plan)
PENALISED = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, presence_penalty=0.4,
                           frequency_penalty=0.6, repetition_penalty=1.3, logit_bias={5: 2.0})
prompts = prompts_fixture(seed=7, lengths=[5, 13, 30])


@pytest.fixture(scope="module")
def mqa_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 query heads and a single KV head (replicated on both ranks at TP=2), an untied LM head, a vocabulary
    that leaves a padding row in rank 1's slice, and the default model's tokenizer files (Engine needs a
    tokenizer; the prompts are token ids below 256)."""
    d = tmp_path_factory.mktemp("tp-mqa")
    cfg = transformers.LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().float().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / f, d / f)
    return d


def rank_pids(engine: Engine) -> list[int]:
    """The tensor-parallel rank processes: the core process's spawned children, not multiprocessing's
    tracker."""
    core = engine._client.proc.pid  # type: ignore[union-attr]
    children = Path(f"/proc/{core}/task/{core}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            pids.append(pid)
    return pids


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(cond: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


MODES = ["unified", "semi-pd"]


@pytest.mark.parametrize("mode", MODES)
def test_tp2_matches_tp1_and_a_rank_killed_mid_decode_fails_the_engine(
    mqa_model_dir: Path, prompts: list[list[int]], mode: str
) -> None:
    want = run_core(mqa_model_dir, prompts, GREEDY.max_tokens)
    knobs = {"device": "cpu", "dtype": "float32", "max_model_len": 512, "num_pages": 256, "page_size": 4}
    with Engine(mqa_model_dir, **knobs) as tp1:
        want_penalised = [o.token_ids for o in tp1.generate(prompts, PENALISED)]
    assert want_penalised != want
    with Engine(mqa_model_dir, mode, tp_size=2, tp_timeout_s=20.0, **knobs) as engine:
        got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
        assert got == want
        assert [o.token_ids for o in engine.generate(prompts, PENALISED)] == want_penalised
        assert engine.refresh_stats().healthy
        assert engine.stats().pages_used == 0
        if mode == "semi-pd":  # one split for all ranks: a new one is refused, the engine keeps serving
            split = engine.stats().prefill_sm_percent
            engine.repartition(70, 30)
            wait_until(lambda: engine.refresh_stats().repartition_failures == 1, 20, "the refused split")
            assert engine.stats().prefill_sm_percent == split
            assert [o.token_ids for o in engine.generate(prompts[:1], GREEDY)] == want[:1]
        (victim,) = rank_pids(engine)

        async def decode_then_kill() -> None:
            long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
            stream = engine.stream(prompts[0], long)
            await stream.__anext__()  # a first token: the ranks are decoding together now
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                async for out in stream:
                    assert not out.finished, "500 tokens decoded after the kill: the rank's death went unseen"

        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(decode_then_kill(), timeout=60))
        assert time.monotonic() - t0 < 60
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.check_health())
        with pytest.raises(EngineDeadError):
            engine.generate(prompts[:1], GREEDY)


DEFAULT_KNOBS = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "num_pages": 64, "page_size": 16}
SHORT = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def default_tp1(prompts: list[list[int]]) -> list[list[int]]:
    """The default model's greedy tokens without TP (an in-process core)."""
    cfg = EngineConfig.from_knobs(model_path=str(default_model_path()), eos_token_ids=[], **DEFAULT_KNOBS)
    core = EngineCore(cfg)
    for i, p in enumerate(prompts):
        core.add_request(AddRequest(f"r{i}", p, CoreSampling(temperature=0.0, max_tokens=8, ignore_eos=True)))
    want: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for ev in core.run_until_idle():
        want[ev.rid] += ev.token_ids
    assert_pool_clean(core)
    return [want[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("mode", MODES)
def test_tp3_default_model_matches_tp1_and_an_idle_dead_rank_is_unhealthy(
    prompts: list[list[int]], default_tp1: list[list[int]], mode: str
) -> None:
    """SmolLM2-135M: 9 query heads and 3 KV heads (one per rank), tied embeddings (the vocab-parallel LM head
    reads the embedding's slice)."""
    with Engine(None, mode, tp_size=3, tp_timeout_s=20.0, **DEFAULT_KNOBS) as engine:
        assert [o.token_ids for o in engine.generate(prompts, SHORT)] == default_tp1
        if mode == "semi-pd":  # the prompts went through the prefill workers, not the decode steps
            assert engine.refresh_stats().prefill_sm_percent > 0
        *others, victim = rank_pids(engine)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not engine.refresh_stats().healthy, 20, "the dead rank to show in the stats")
        with pytest.raises(EngineDeadError, match=f"pid {victim}"):
            asyncio.run(engine.check_health())
        with pytest.raises(EngineDeadError):
            engine.generate(prompts[:1], GREEDY)
    wait_until(lambda: not any(running(p) for p in others), 30, "the surviving ranks to exit with the engine")
