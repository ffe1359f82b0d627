"""Re-partition and the SLO policy through `Engine` on the default model (CPU, `none` backend): a Repartition
message during concurrent streams, the slo policy end to end, and the Engine's argument errors."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from semipd_runtime import Engine, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    " ".join(f"word{i}" for i in range(120)) + ". Summarize:",
    "List three fruits: apple,",
    "def add(a, b):\n    return",
    "Question: why is the sky blue?\nAnswer:",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("kw, name", [
    (dict(partition_policy="adaptive"), "partition_policy"),
    (dict(partition_policy="slo"), "mode='semi-pd'"),  # unified mode has no split to move
    (dict(mode="semi-pd", partition_policy="slo", slo_ttft_ms=0), "slo_ttft_ms"),
    (dict(mode="semi-pd", partition_policy="slo", slo_tpot_ms=float("inf")), "slo_tpot_ms"),
    (dict(mode="semi-pd", repartition_interval_s=-2.0), "repartition_interval_s"),
    (dict(mode="semi-pd", partition_policy="slo", slo_options={"profile_split": 2}), "profile_split"),
])
def test_engine_rejects_bad_slo_arguments(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Engine(**kw)  # fails before any model is loaded


def streams(eng: Engine, prompts: list[str], during: object = None) -> list[list[int]]:
    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.15 * i)  # a stream of arrivals, not one batch
        last = None
        async for o in eng.stream(prompts[i], GREEDY, request_id=f"s{i}"):
            last = o
        assert last is not None and last.finished and last.outputs[0].finish_reason == "length"
        return last.outputs[0].token_ids

    async def run() -> list[list[int]]:
        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        if callable(during):
            await asyncio.sleep(0.3)
            during()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=240))

    return asyncio.run(run())


@pytest.mark.slow
def test_repartition_message_during_streams_changes_nothing_but_the_split() -> None:
    prompts = PROMPTS
    with Engine(num_pages=512) as eng:
        want = [o.token_ids for o in eng.generate(prompts, GREEDY)]
    with Engine(mode="semi-pd", sm_partition="none", prefill_placement="process", num_pages=512,
                chunked_prefill_size=64, max_prefill_tokens=200, core="process") as eng:
        eng.generate("warm up", SamplingParams(max_tokens=1))
        old_pid = eng.refresh_stats().prefill_pid
        got = streams(eng, prompts, during=lambda: eng.repartition(30, 70))
        deadline = time.monotonic() + 180  # a standby process starts in ~15-45 s on a busy 2-core CPU
        while eng.refresh_stats().repartitions < 1:  # requests may all finish before the standby is ready
            assert time.monotonic() < deadline, "re-partition never took effect"
            time.sleep(0.2)
        stats = eng.refresh_stats()
        assert (stats.prefill_sm_percent, stats.decode_sm_percent) == (30.0, 70.0)
        assert stats.pages_used == 0 and stats.healthy and stats.last_repartition_s > 0
        new_pid = stats.prefill_pid
        assert new_pid and new_pid != old_pid
        more = [o.token_ids for o in eng.generate(prompts[:2], GREEDY)]  # served by the new worker
        for _ in range(100):  # the old worker is retired at a later step: reaped, so its pid is gone
            try:
                os.kill(old_pid, 0)
            except ProcessLookupError:
                break
            eng.generate("tick", SamplingParams(max_tokens=1))
        else:
            pytest.fail(f"old prefill process {old_pid} still exists")
        stats = eng.refresh_stats()
        assert stats.pages_used == 0 and stats.integrity_error == ""
    assert got == want and more == want[:2]


@pytest.mark.slow
def test_slo_policy_end_to_end(tmp_path: Path) -> None:
    opts = dict(profile_splits=2, profile_requests=4, profile_prompt_tokens=48, profile_decode_tokens=4,
                profile_cache_dir=str(tmp_path), min_dwell_s=0.0, hysteresis=0.0)
    with Engine(mode="semi-pd", sm_partition="none", prefill_placement="thread", num_pages=512,
                chunked_prefill_size=64, core="thread", partition_policy="slo", slo_ttft_ms=300, slo_tpot_ms=30,
                repartition_interval_s=0.2, slo_options=opts) as eng:
        assert list(tmp_path.glob("slo_profile--*.json"))  # the startup profile was measured and cached
        streams(eng, PROMPTS)
        stats = eng.refresh_stats()
        assert stats.partition_policy == "slo"
        assert stats.slo_decisions >= 1 and stats.slo_observations > 0
        assert stats.predicted_ttft_s > 0 and stats.predicted_tpot_s > 0
        assert stats.measured_tpot_s > 0
        assert stats.pages_used == 0 and stats.healthy
        assert 0 < stats.prefill_sm_percent < 100 and 0 < stats.decode_sm_percent < 100
