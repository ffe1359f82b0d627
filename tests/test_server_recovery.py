"""Issue 23, engine core death through the real server: in-flight requests fail with an answer (503, or on a
stream an error event and [DONE]); then the server exits with code 3 for its supervisor, or with
--restart-core starts a new core in place and serves again. /health says which. Also: a non-ASCII bearer
token is a 401, not a 500."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from semipd_server.testing import ServerProcess, child_pids, pid_alive, proc_cmdline, scrape_metrics

pytestmark = pytest.mark.slow
KEY = "recovery-key"
LONG = {"prompt": "Count:", "max_tokens": 2000, "ignore_eos": True}


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s}s"
        time.sleep(0.05)


def first_tokens(server: ServerProcess) -> float:
    """Requests that got their first token so far (the TTFT histogram's count)."""
    return scrape_metrics(server.url)["semipd:time_to_first_token_seconds_count{}"]


def core_pid(server: ServerProcess) -> int:
    (pid,) = [p for p in child_pids(server.proc.pid) if "spawn_main" in proc_cmdline(p)]
    return pid


def start(tmp: Path, *args: str) -> ServerProcess:
    return ServerProcess("--num-pages", "512", "--max-running-requests", "4", *args,
                         log_path=tmp / "server.log", api_key=KEY)


class InFlight:
    """A long non-streaming and a long streaming request in threads; their answers once the engine fails."""

    def __init__(self, server: ServerProcess, body: dict[str, object] = LONG) -> None:
        self.results: dict[str, tuple[int, str]] = {}
        self.streaming = threading.Event()
        h, url = server.headers(), f"{server.url}/v1/completions"

        def whole() -> None:
            r = httpx.post(url, json=body, headers=h, timeout=300)
            self.results["whole"] = (r.status_code, r.text)

        def streamed() -> None:
            with httpx.stream("POST", url, json={**body, "stream": True}, headers=h, timeout=300) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    self.streaming.set()
                self.results["stream"] = (r.status_code, "\n".join(lines))

        before = first_tokens(server)
        self.threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for t in self.threads:
            t.start()
        assert self.streaming.wait(60), "the stream never started"
        # both past prefill (on a slow machine the second can still be queued when the stream starts)
        wait_for(lambda: first_tokens(server) >= before + 2, 60, "both requests decoding")

    def check_failed(self) -> None:
        for t in self.threads:
            t.join(60)
        status, text = self.results["whole"]
        assert status == 503, text
        assert json.loads(text)["error"]["type"] == "service_unavailable"
        status, text = self.results["stream"]
        events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"  # the 200 had gone out: the error comes in-band
        assert json.loads(events[-2])["error"]["type"] == "service_unavailable"


def test_non_ascii_bearer_is_401_and_dead_core_exits_3(tmp_path: Path) -> None:
    server = start(tmp_path)
    try:
        for token in ("Bearer ключ".encode(), b"Bearer \xff\xfe"):
            r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"},
                           headers={"Authorization": token}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert 'semipd:request_errors_total{model_name="SmolLM2-135M-Instruct",status="401"} 2.0' in httpx.get(
            f"{server.url}/metrics", timeout=30).text
        health = httpx.get(f"{server.url}/health", timeout=30)  # open without the key
        assert health.json() == {"status": "ok", "on_core_death": "exit"}
        children = child_pids(server.proc.pid)
        flight = InFlight(server)
        os.kill(core_pid(server), signal.SIGKILL)
        flight.check_failed()
        assert server.proc.wait(60) == 3, server.log()
        wait_for(lambda: not any(pid_alive(p) for p in children), 20, "engine processes gone")
        log = server.log()
        assert "engine core failed (engine core process died" in log and "exiting with code 3" in log, log
    finally:
        server.stop()


def test_restart_core_serves_again(tmp_path: Path) -> None:
    server = start(tmp_path, "--restart-core")
    try:
        assert httpx.get(f"{server.url}/health", timeout=30).json()["on_core_death"] == "restart"
        old_core = core_pid(server)
        flight = InFlight(server)
        os.kill(old_core, signal.SIGKILL)
        flight.check_failed()
        seen: list[str] = []

        def healthy() -> bool:
            r = httpx.get(f"{server.url}/health", timeout=30)
            if r.status_code != 200:
                seen.append(r.json()["error"]["code"])
            return r.status_code == 200

        wait_for(healthy, 120, "healthy again")
        assert "engine_restarting" in seen, seen  # /health said what was going on meanwhile
        assert server.proc.poll() is None and core_pid(server) != old_core
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4},
                       headers=server.headers(), timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert "engine core restarted in" in server.log()
        children = child_pids(server.proc.pid)
        assert server.stop() == 0, server.log()
        wait_for(lambda: not any(pid_alive(p) for p in children), 20, "engine processes gone")
    finally:
        server.stop()



def test_semipd_prefill_worker_death_replaces_the_worker_in_place(tmp_path: Path) -> None:
    """A semi-PD prefill worker that dies fails only the batch it was given; the core replaces it at the same
    split while decoding goes on (no core restart, nothing else fails), and later prompts are served."""
    server = start(tmp_path, "--mode", "semi-pd", "--restart-core", "--core-unhealthy-timeout", "2")
    try:
        old_core = core_pid(server)
        (prefill,) = [p for p in child_pids(old_core) if "spawn_main" in proc_cmdline(p)]
        flight = InFlight(server, {**LONG, "max_tokens": 200})  # decoding when the prefill worker dies
        os.kill(prefill, signal.SIGKILL)
        # the dead worker is noticed when a batch is sent to it: that prompt fails, and only that one
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi there", "max_tokens": 2},
                       headers=server.headers(), timeout=60)
        assert r.status_code == 503 and "prefill worker" in r.json()["error"]["message"], r.text

        def replaced() -> bool:
            return any("spawn_main" in proc_cmdline(p) and p != prefill for p in child_pids(old_core))

        wait_for(replaced, 120, "a new prefill worker")
        wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 200, 120, "healthy again")
        for t in flight.threads:
            t.join(300)
        assert set(flight.results) == {"whole", "stream"}, "an in-flight request got no answer"
        # decoding was never interrupted: both ran to their length
        status, text = flight.results["whole"]
        assert status == 200 and json.loads(text)["choices"][0]["finish_reason"] == "length", text
        status, text = flight.results["stream"]
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]", text
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4},
                       headers=server.headers(), timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert core_pid(server) == old_core, "the core itself was restarted"
        assert "engine core failed" not in server.log()
        assert server.stop() == 0, server.log()
    finally:
        server.stop()


def test_tp_rank_death_fails_in_flight_requests_and_the_server_exits(tmp_path: Path) -> None:
    """Issue 19 through the server: a rank (not the leader) SIGKILLed mid-decode; in-flight requests get their
    answers (503, or an error event and [DONE]) and the server exits 3 (no --restart-core), no rank left."""
    server = start(tmp_path, "--tp-size", "3")
    try:
        core = core_pid(server)
        ranks = [p for p in child_pids(core) if "spawn_main" in proc_cmdline(p)]
        assert len(ranks) == 2, ranks
        flight = InFlight(server)
        os.kill(ranks[0], signal.SIGKILL)
        flight.check_failed()
        assert server.proc.wait(60) == 3, server.log()
        wait_for(lambda: not any(pid_alive(p) for p in [core, *ranks]), 20, "rank processes gone")
    finally:
        server.stop()
