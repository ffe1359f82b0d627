"""bench_prefix_cache on CPU at the tiny shape: the script runs, the cache serves the hit case's prefix pages and
none of the miss's, and the cached path picks the same greedy token as computing the whole prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prefix_cache.py"


@pytest.mark.slow  # the benchmark script end to end in a subprocess
def test_bench_prefix_cache_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "prefix_cache.json"
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--prefix-len", "256",
           "--suffix-len", "32", "--repeats", "3", "--warmup", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "speed-up of hit over miss" in done.stdout and "hit == miss: 3/3" in done.stdout
    r = json.loads(out.read_text())
    assert (r["prefix_len"], r["suffix_len"], r["repeats"], r["expected_hit_tokens"]) == (256, 32, 3, 256)
    cases = r["cases"]
    assert cases["miss"]["hit_tokens"] == [0] * 3  # radix cache off
    assert cases["prime"]["hit_tokens"] == [0] * 3  # a fresh prefix each repeat: nothing to share yet
    assert cases["hit"]["hit_tokens"] == [256] * 3  # the whole prefix, page for page; the suffix computed
    for c in cases.values():
        assert c["query_tokens"] == [256 + 32] * 3
        assert len(c["ttft_ms"]) == 3 and 0 < c["min_ms"] <= c["median_ms"]
    assert r["greedy_match"] and all(g["miss_token"] == g["hit_token"] for g in r["greedy"])
    assert r["max_logprob_diff"] < 1e-3
    # totals since start on the caching core: (1 warm-up + 3) hits of 256 tokens over 2 prompts per repeat
    assert r["engine_stats"]["prefix_hit_tokens"] == 4 * 256
    assert r["engine_stats"]["prefix_query_tokens"] == 4 * 2 * (256 + 32)
    assert r["speedup_median"] > 0  # no timing ratio asserted on CPU
