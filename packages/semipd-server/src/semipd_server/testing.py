"""Test support: run the real `semipd-server` console script as a subprocess on 127.0.0.1 (free port).

Needs httpx (a test dependency); nothing in the server imports this module."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def proc_cmdline(pid: int) -> str:
    """Command line of `pid`, "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ServerProcess:
    def __init__(
        self, *args: str, log_path: Path, api_key: str | None = None, startup_timeout_s: float = 600.0,
        single_thread: bool = True, fixed_port: int | None = None, env: dict[str, str] | None = None,
    ) -> None:
        self.port = fixed_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        script = Path(sys.executable).parent / "semipd-server"
        # the console script where the package is installed; the module where it is only on PYTHONPATH (GPU box)
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "semipd_server.cli"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        # One intra-op thread: on a small shared CPU box, two OpenMP threads in the engine core process slow
        # each step 10-20x whenever another process competes for the cores (measured); tests only.
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"} | ({"OMP_NUM_THREADS": "1"} if single_thread else {})
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env | (env or {}))
        self._wait_healthy(startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout_s}s:\n{self.log()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)


def scrape_metrics(url: str) -> dict[str, float]:
    """A server's /metrics samples by name + its labels (JSON, model_name left out)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        s.name + json.dumps({k: v for k, v in sorted(s.labels.items()) if k != "model_name"}): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
