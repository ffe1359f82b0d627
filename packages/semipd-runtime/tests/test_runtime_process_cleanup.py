"""SIGKILL of the front end or of the core process leaves no process and nothing in the temp dir behind
(issue 23 item 6: /tmp/semipd-* and /tmp/semipd-prefill-* used to stay)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from runtime_fixtures import random_model_fixture

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; abstract IPC names")]

model_dir = random_model_fixture("cleanup")
HOLDER = Path(__file__).parent / "process_core_holder.py"


def running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def spawned_children(pid: int) -> list[int]:
    """Children of `pid` started by multiprocessing's spawn (not its resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(entry.name))
    return out


def wait_until(cond: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("victim", ["front end", "core"])
def test_sigkill_leaves_no_ipc_paths(model_dir: Path, tmp_path: Path, victim: str) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}  # the front end and its children put temp files here only
    holder = subprocess.Popen([sys.executable, str(HOLDER), str(model_dir)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert holder.stdout is not None
        core = int(holder.stdout.readline())  # after CoreReady: the prefill process is started by then
        wait_until(lambda: spawned_children(core), 60, "the prefill process")
        pids = [core, *spawned_children(core)]
        assert len(pids) == 2
        assert not list(tmp.glob("semipd*"))  # abstract-namespace endpoints: nothing on disk even while up
        os.kill(holder.pid if victim == "front end" else core, signal.SIGKILL)
        # orphans notice their parent is gone and exit: the core (front end killed), the prefill worker (both)
        wait_until(lambda: not any(running(p) for p in pids), 60, f"{pids} to exit")
        assert not list(tmp.glob("semipd*"))
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)



def test_sigint_to_the_children_leaves_them_serving(model_dir: Path) -> None:
    """Ctrl-C in a terminal signals the whole process group: the core and the prefill worker ignore it (the
    front end drains, then stops them), so a request still completes."""
    import threading

    from runtime_fixtures import core_config

    from semipd_runtime.core_client import ProcessCoreClient
    from semipd_runtime.messages import AddRequest, CoreSampling, StepOutput

    done = threading.Event()
    tokens: list[int] = []

    def on_output(msg: object) -> None:
        for ev in msg.events if isinstance(msg, StepOutput) else []:
            tokens.extend(ev.token_ids)
            if ev.finish_reason is not None:
                done.set()

    cfg = core_config(model_dir, max_model_len=128, num_pages=64, mode="semi-pd", prefill_placement="process")
    client = ProcessCoreClient(cfg, on_output=on_output, startup_timeout_s=300)
    try:
        victims = [client.proc.pid, *spawned_children(client.proc.pid)]
        assert len(victims) == 2, victims  # the core and its prefill worker
        for pid in victims:
            os.kill(pid, signal.SIGINT)
        client.send(AddRequest("r", [1, 2, 3], CoreSampling(temperature=0, max_tokens=4, ignore_eos=True)))
        assert done.wait(120), "the request did not finish"
        assert len(tokens) == 4 and all(running(p) for p in victims)
    finally:
        client.close()
