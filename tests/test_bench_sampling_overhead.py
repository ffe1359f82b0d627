"""bench_sampling_overhead on CPU at the tiny shape: the script runs every case and writes its JSON (no timing
ratio is asserted on CPU; the GPU numbers go to benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling_overhead.py"


@pytest.mark.slow  # the benchmark script end to end in a subprocess
def test_bench_sampling_overhead_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "sampling_overhead.json"
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--batches", "4", "--contexts", "32",
           "--iters", "3", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["shape"], r["device"], r["cases_vs"]) == ("tiny", "cpu", "none")
    assert [row["case"] for row in r["rows"]] == ["none", "penalties", "all"]
    for row in r["rows"]:
        assert (row["batch"], row["ctx"]) == (4, 32) and row["step_ms"] > 0 and row["sample_ms"] > 0
    assert r["rows"][0]["overhead_pct"] == 0.0
