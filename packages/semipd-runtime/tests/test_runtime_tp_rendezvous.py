"""A SIGKILLed TP leader leaves its rendezvous directory behind; the next start removes it (and only it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from semipd_runtime.parallel.leader import sweep_stale_rendezvous


def test_stale_rendezvous_dirs_are_swept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = tmp_path / f"semipd-tp-{dead_pid}-abc"
    live = tmp_path / f"semipd-tp-{os.getpid()}-def"
    other = tmp_path / "semipd-tp-notapid-x"
    for d in (stale, live, other):
        d.mkdir()
        (d / "rendezvous").write_text("x")
    assert sweep_stale_rendezvous(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()
