"""Semi-PD mode end to end on the default model (CPU, `none` backend): separate prefill process and threaded layout."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator

import pytest

from semipd_runtime import Engine, SamplingParams
from semipd_runtime.errors import EngineDeadError
from semipd_runtime.shared_pool_prefill import SharedPoolPrefill

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "List three fruits: apple,",
    "In 1969, the first person to walk on the moon was",
    " ".join(f"word{i}" for i in range(150)) + ". Summarize:",
    "Hi",
    "def add(a, b):\n    return",
    "Question: why is the sky blue?\nAnswer:",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
# the prefill worker samples first tokens (repetition over the prompt, bias, min_tokens), the decode core the rest
PENALISED = [SamplingParams(temperature=0.0, max_tokens=16, presence_penalty=0.5 * (i % 3),
                            frequency_penalty=0.3 * (i % 2), repetition_penalty=1.0 + 0.15 * (i % 4),
                            min_tokens=i, logit_bias={198: -100.0} if i % 2 else None) for i in range(len(PROMPTS))]

pytestmark = pytest.mark.slow  # the real default model in real prefill processes


@pytest.fixture(scope="module")
def unified_outputs() -> list[list[int]]:
    with Engine(num_pages=512) as eng:
        plain = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
        penalised = [o.token_ids for o in eng.generate(PROMPTS, PENALISED)]
    assert penalised != [t[: len(p)] for t, p in zip(plain, penalised)]
    return plain + penalised


@pytest.mark.parametrize("placement", ["process", "thread"])
def test_semipd_greedy_equals_unified(placement: str, unified_outputs: list[list[int]]) -> None:
    with Engine(mode="semi-pd", sm_partition="none", prefill_placement=placement, num_pages=512,
                chunked_prefill_size=64, max_prefill_tokens=200, core="process") as eng:
        got = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
        got += [o.token_ids for o in eng.generate(PROMPTS, PENALISED)]
        stats = eng.refresh_stats()
        assert stats.pages_used == 0 and stats.healthy
    assert got == unified_outputs


@pytest.fixture(scope="module")
def semi_engine() -> Iterator[Engine]:
    eng = Engine(mode="semi-pd", sm_partition="none", prefill_placement="process", num_pages=512,
                 chunked_prefill_size=64, core="thread")
    yield eng
    eng.shutdown()


def test_prefill_process_maps_and_does_not_copy(semi_engine: Engine) -> None:
    core = semi_engine._client.core  # type: ignore[union-attr]
    executor = core.executor
    assert isinstance(executor, SharedPoolPrefill)
    for _ in range(100):
        if executor.ready.pid:
            break
        semi_engine.generate("warm up", SamplingParams(max_tokens=1))
        time.sleep(0.05)
    info = executor.ready
    assert info.pid and info.pid != os.getpid()
    assert info.all_shared
    weight_bytes = sum(p.numel() * p.element_size() for p in core.model.parameters())
    kv_bytes = core.kv_pool.buffer.numel() * core.kv_pool.buffer.element_size()
    assert info.mapped_bytes == weight_bytes + kv_bytes


def test_random_aborts_leave_integrity_clean(semi_engine: Engine) -> None:
    rng = random.Random(0)

    async def one(i: int) -> str | None:
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True)
        stop_after = rng.choice([0, 1, 3, None])
        reason = None
        async for o in semi_engine.stream(PROMPTS[i % len(PROMPTS)], params, request_id=f"ab{i}"):
            if stop_after is not None and len(o.outputs[0].token_ids) >= stop_after:
                semi_engine.abort(f"ab{i}")
            reason = o.outputs[0].finish_reason
        return reason

    async def many() -> list[str | None]:
        return await asyncio.gather(*(one(i) for i in range(24)))

    reasons = asyncio.run(many())
    assert set(reasons) <= {"abort", "length"} and "abort" in reasons
    for _ in range(50):
        stats = semi_engine.refresh_stats()
        if stats.pages_used == 0:
            break
        time.sleep(0.1)
    assert stats.pages_used == 0
    assert stats.integrity_error == ""


def test_killing_prefill_process_fails_its_requests_then_a_new_worker_serves() -> None:
    with Engine(mode="semi-pd", sm_partition="none", prefill_placement="process", num_pages=512,
                chunked_prefill_size=16, core="process") as eng:
        eng.generate("warm up", SamplingParams(max_tokens=2))
        pid = eng.refresh_stats().prefill_pid
        assert pid

        async def run() -> tuple[list[object], str | None]:
            long_prompt = " ".join(f"token{i}" for i in range(600))
            decoding = eng.stream(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
            first = await decoding.__anext__()  # this one is decoding when the prefill worker dies
            assert first.outputs[0].token_ids
            os.kill(pid, signal.SIGKILL)  # idle: the next batch goes to a dead worker and fails

            async def maybe_doomed() -> object:
                try:
                    async for _ in eng.stream(long_prompt, SamplingParams(max_tokens=4)):
                        pass
                    return "finished"
                except EngineDeadError as e:
                    return e

            results = await asyncio.wait_for(asyncio.gather(*(maybe_doomed() for _ in range(3))), timeout=120)
            last = first
            async for o in decoding:
                last = o
            return results, last.outputs[0].finish_reason

        results, decode_reason = asyncio.run(run())
        # the batch the dead worker held failed (at least the first one); anything later was served by its
        # replacement
        assert all(r == "finished" or isinstance(r, EngineDeadError) for r in results), results
        assert isinstance(results[0], EngineDeadError) or any(isinstance(r, EngineDeadError) for r in results)
        assert decode_reason == "length"  # the decode worker kept serving what it had
        deadline = time.monotonic() + 120
        while not eng.refresh_stats().healthy:  # a fresh prefill worker is starting
            assert time.monotonic() < deadline, "the prefill worker did not come back"
            time.sleep(0.1)
        asyncio.run(eng.check_health())
        assert eng.stats().prefill_pid not in (0, pid)
        assert eng.generate("new request", SamplingParams(max_tokens=2))[0].outputs[0].token_ids
        assert eng.refresh_stats().pages_used == 0
