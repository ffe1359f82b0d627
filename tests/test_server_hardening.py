"""Issue 23 through the real server process (default model, CPU): /health stays fast while multi-megabyte
prompts are parsed and tokenized, 413 before an oversized body is read, malformed bodies are 400, what can never
fit is 400 (not 429), an empty SEMIPD_API_KEY means auth off, and the drain timeout answers every request it
cuts off (503, or an error event and [DONE]) before the process exits 0. Engine core death: tests/
test_server_recovery.py."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from semipd_server.testing import ServerProcess, child_pids, pid_alive, scrape_metrics

pytestmark = pytest.mark.slow
LIMIT = 12 << 20  # --max-request-bytes: room for a 10 MB prompt
DRAIN_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--num-pages", "512", "--max-running-requests", "2", "--max-queued-requests", "1",
        "--max-request-bytes", str(LIMIT), "--drain-timeout", str(DRAIN_S),
        log_path=tmp_path_factory.mktemp("hardening") / "server.log",
        env={"SEMIPD_API_KEY": ""},  # empty: auth off
    )
    yield srv
    srv.stop()


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s}s"
        time.sleep(0.05)


def counters(server: ServerProcess) -> dict[str, float]:
    return scrape_metrics(server.url)


def test_health_stays_fast_while_huge_prompts_are_handled(server: ServerProcess) -> None:
    ten_mb = "lorem ipsum dolor sit amet " * (10_000_000 // 27)
    # just under the character bound, so each one is really tokenized (seconds of work) before its 400
    bound = 8192 * 82 * 4
    big = ["The quick brown fox jumps over the lazy dog. " * (bound // 45 - 1) for _ in range(3)]
    # encoded up front: the probe below must not wait on this process's own JSON encoding
    bodies = [json.dumps({"prompt": p}).encode() for p in [ten_mb, *big]]
    results: list[tuple[int, dict[str, object]]] = []
    done = threading.Event()

    def post(client: httpx.Client, body: bytes) -> None:
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        results.append((r.status_code, r.json()))

    def post_all() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            threads = [threading.Thread(target=post, args=(client, b)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        done.set()

    worker = threading.Thread(target=post_all)
    started = time.monotonic()
    worker.start()
    latencies, small = [], []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        while not done.is_set():
            t0 = time.monotonic()
            r = probe.get("/health")
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            if len(latencies) % 25 == 5:  # a small request is not queued behind the huge ones' tokenizing
                t0 = time.monotonic()
                r = probe.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
                small.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
            time.sleep(0.02)
    worker.join()
    handled_s = time.monotonic() - started
    assert len(results) == 4
    for status, body in results:
        err = body["error"]
        assert status == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt", body  # type: ignore[index]
    messages = sorted(str(b["error"]["message"]) for _, b in results)  # type: ignore[index]
    assert sum("characters" in m for m in messages) == 1  # the 10 MB one: refused before tokenizing
    assert sum(" tokens;" in m for m in messages) == 3  # the others: tokenized, then refused
    ordered = sorted(latencies)
    print(f"/health under huge prompts ({handled_s:.1f}s, {len(latencies)} probes): max {ordered[-1] * 1000:.1f} ms, "
          f"p95 {ordered[int(len(ordered) * 0.95)] * 1000:.1f} ms, median {ordered[len(ordered) // 2] * 1000:.1f} ms")
    assert handled_s > 1.0 and len(latencies) >= 10  # the probes really overlapped the work
    # 100 ms is the bar (the loop used to stall for seconds); a single probe may still wait on the OS scheduler
    # of a small shared machine (max 9-60 ms in most runs, 101-550 ms with load 6-10 on 2 cores): p95, and a
    # cap far below the seconds the loop used to stall for
    assert ordered[int(len(ordered) * 0.95)] < 0.1 and ordered[-1] < 1.0
    print(f"small completions meanwhile: {', '.join(f'{t * 1000:.0f} ms' for t in small)}")
    assert small and max(small) < 1.0


def raw_request(server: ServerProcess, head: bytes, body: bytes) -> bytes:
    """Send the head and only `body` of a request, then read what the server answers (it must not wait)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_oversized_body_is_413_before_the_rest_is_read(server: ServerProcess) -> None:
    before = counters(server)
    declared = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (100 << 20))
    reply = raw_request(server, declared, b'{"prompt": "' + b"x" * 65536)  # 64 KB of a declared 100 MB
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [b"x" * (1 << 20)] * 12 + [b"x" * 1024]  # 1 KB past the limit, and the body never ends
    reply = raw_request(server, chunked, b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    after = counters(server)
    assert after['semipd:request_errors_total{"status": "413"}'] - before.get(
        'semipd:request_errors_total{"status": "413"}', 0) == 2
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_malformed_bodies_are_400_and_counted(server: ServerProcess) -> None:
    before = counters(server).get('semipd:request_errors_total{"status": "400"}', 0)
    url = f"{server.url}/v1/completions"
    bodies = [b'{"prompt": "caf\xe9 \xff", "max_tokens": 2}', b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]
    for body in bodies:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == "invalid_json"
    assert counters(server)['semipd:request_errors_total{"status": "400"}'] - before == 2


def test_never_fits_is_400_not_429(server: ServerProcess) -> None:
    # running 2 + queued 1: n=4 can never be admitted, however long the client waits
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "n": 4, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["code"] == "exceeds_capacity" and err["param"] == "n" and "--max-queued-requests 1" in err["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 2}, timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_empty_api_key_means_auth_off_and_models_hide_paths(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text
    card = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["root"] == "SmolLM2-135M-Instruct" and "/" not in card["root"]
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok", "on_core_death": "exit"}
    assert "auth off" in server.log()


def test_drain_timeout_answers_every_request_then_exits(server: ServerProcess) -> None:
    """Last in this module: SIGTERM with requests that outlive --drain-timeout."""
    children = child_pids(server.proc.pid)
    long = {"prompt": "Count:", "max_tokens": 2000, "ignore_eos": True}
    results: dict[str, object] = {}

    def whole() -> None:
        r = httpx.post(f"{server.url}/v1/completions", json=long, timeout=120)
        results["whole"] = (r.status_code, r.json())

    def streamed() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True}, timeout=120) as r:
            results["stream"] = (r.status_code, r.read().decode())

    threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    wait_for(lambda: counters(server)["semipd:num_requests_running{}"] == 2, what="both requests running")
    server.terminate(signal.SIGTERM)
    for t in threads:
        t.join(60)
    status, body = results["whole"]  # type: ignore[misc]
    assert status == 503 and body["error"]["code"] == "drain_timeout", body
    assert f"drain timeout ({DRAIN_S:g}s)" in body["error"]["message"]
    status, text = results["stream"]  # type: ignore[misc]
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "drain_timeout"
    assert any("choices" in json.loads(e) for e in events[:-2])  # it had been streaming tokens
    assert server.proc.wait(60) == 0, server.log()
    wait_for(lambda: not any(pid_alive(p) for p in children), 20, "engine processes gone")
    log = server.log()
    assert "drain timeout (2s): 2 requests still in flight; answering each with 503" in log, log
    assert "all 2 cut-off requests answered" in log
