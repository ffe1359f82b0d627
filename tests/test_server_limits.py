"""The real server at its limits: 429 only past --max-queued-requests, graceful drain on SIGTERM (503 for new
requests, in-flight ones finish, exit 0, no child process left)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from semipd_server.testing import ServerProcess, child_pids, pid_alive

pytestmark = pytest.mark.slow
MAX_RUNNING, MAX_QUEUED = 2, 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--num-pages",
        "256",
        "--max-running-requests",
        str(MAX_RUNNING),
        "--max-queued-requests",
        str(MAX_QUEUED),
        "--drain-timeout",
        "120",
        log_path=tmp_path_factory.mktemp("limits") / "server.log",
    )
    yield srv
    srv.stop()


def gauge(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return next(
        s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name
    )


def wait_for(cond: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


LONG = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}


def test_429_only_past_max_queued(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        open_streams = []
        # running + queued requests are all accepted (the header of each stream arrives once it is queued)
        for _ in range(MAX_RUNNING + MAX_QUEUED):
            resp = client.send(client.build_request("POST", "/v1/completions", json=LONG), stream=True)
            assert resp.status_code == 200, resp.read()
            open_streams.append(resp)
        wait_for(lambda: gauge(server, "semipd:num_requests_running") == MAX_RUNNING)
        assert gauge(server, "semipd:num_requests_waiting") == MAX_QUEUED
        for body in (
            {"prompt": "x", "max_tokens": 2},
            {**LONG, "max_tokens": 2},
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = client.post(path, json=body)
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full" and err["message"]
        # one client leaves: its slot frees and a new request is accepted again
        open_streams.pop(0).close()

        def accepted() -> bool:
            # streamed, so that the 200 header (= queued) comes back without waiting for a running slot
            resp = client.send(client.build_request("POST", "/v1/completions", json=LONG), stream=True)
            assert resp.status_code in (200, 429), resp.read()
            if resp.status_code == 429:
                resp.close()
                return False
            open_streams.append(resp)
            return True

        wait_for(accepted)
        for resp in open_streams:
            resp.close()
    wait_for(lambda: gauge(server, "semipd:kv_pages_used") == 0)
    assert gauge(server, "semipd:num_requests_running") == 0


def test_sigterm_drains_then_exits_cleanly(server: ServerProcess) -> None:
    children = child_pids(server.proc.pid)
    assert children, "the engine core should run in a child process"
    results: dict[str, object] = {}

    def in_flight_stream() -> None:
        with httpx.stream(
            "POST",
            f"{server.url}/v1/completions",
            timeout=120,
            json={
                "prompt": "Tell me a story.",
                "max_tokens": 24,
                "ignore_eos": True,
                "stream": True,
                "temperature": 0,
            },
        ) as resp:
            results["stream_status"] = resp.status_code
            results["stream_body"] = resp.read().decode()

    def in_flight_whole() -> None:
        r = httpx.post(
            f"{server.url}/v1/completions",
            timeout=120,
            json={"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True},
        )
        results["whole"] = (r.status_code, r.json())

    threads = [threading.Thread(target=in_flight_stream), threading.Thread(target=in_flight_whole)]
    for t in threads:
        t.start()
    wait_for(lambda: gauge(server, "semipd:num_requests_in_flight") == 2)
    server.terminate(signal.SIGTERM)
    wait_for(lambda: gauge(server, "semipd:server_draining") == 1, 30)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
    for t in threads:
        t.join(120)
    status, body = results["whole"]  # type: ignore[misc]
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 24
    assert results["stream_status"] == 200
    events = [e[len("data: ") :] for e in str(results["stream_body"]).split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0, server.log()
    wait_for(lambda: not any(pid_alive(p) for p in children), 20)
    log = server.log()
    assert "draining" in log and "listening on" in log and "KV pages" in log
