"""PD disaggregation end to end on CPU: a prefill instance and a decode instance (real `semipd-server`
processes, KV moved by the Mooncake transfer engine over TCP) behind the real `smg` gateway give the greedy
outputs of one unified engine, free every page on both sides after random client disconnects, and end requests
with an error in bounded time when the prefill instance dies, then serve again once it is back."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("mooncake.engine", reason="needs the Mooncake transfer engine (semipd-server[pd])")
SMG = Path(sys.executable).parent / "smg"
if not SMG.exists():
    pytest.skip("needs the smg gateway binary (semipd-server[pd])", allow_module_level=True)

from semipd_runtime import Engine, SamplingParams  # noqa: E402 - only once the binaries are known present
from semipd_server.testing import ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
ENGINE_FLAGS = ["--num-pages", "512", "--max-running-requests", "16", "--page-size", "16"]
PD_ENV = {"SEMIPD_DISAGGREGATION_HEARTBEAT_INTERVAL": "1", "SEMIPD_DISAGGREGATION_WAITING_TIMEOUT": "60"}


def _wait(cond, what: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


class Pd:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.boot = free_port()
        self.prefill = self.start_prefill()
        self.decode = ServerProcess("--decode-only", "--disaggregation-bootstrap-port", str(self.boot),
                                    *ENGINE_FLAGS, log_path=tmp / "decode.log")
        self.port = free_port()
        self.smg_log = open(tmp / "smg.log", "wb")  # noqa: SIM115 - closed in close()
        self.smg = subprocess.Popen(
            [str(SMG), "launch", "--pd-disaggregation", "--prefill", self.prefill.url, str(self.boot),
             "--decode", self.decode.url, "--host", "127.0.0.1", "--port", str(self.port),
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
             # probe every 2 s (default 60): a restarted prefill is back in rotation within seconds
             "--health-check-interval-secs", "2", "--cb-timeout-duration-secs", "5"],
            stdout=self.smg_log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        _wait(self._serves, "smg to route a request", 120)

    def start_prefill(self, port: int | None = None) -> ServerProcess:
        srv = ServerProcess("--prefill-only", "--disaggregation-bootstrap-port", str(self.boot), *ENGINE_FLAGS,
                            log_path=self.tmp / f"prefill-{time.monotonic_ns()}.log", fixed_port=port)
        return srv

    def _serves(self) -> bool:
        assert self.smg.poll() is None, (self.tmp / "smg.log").read_text()[-3000:]
        try:
            r = httpx.post(f"{self.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                           timeout=30)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def pages_used(self, srv: ServerProcess) -> tuple[int, str]:
        st = httpx.get(f"{srv.url}/server_info", timeout=30).json()["internal_states"][0]
        return int(st["pages_used"]) + int(st["num_running"]) + int(st["num_waiting"]), st["integrity_error"]

    def close(self) -> None:
        self.smg.terminate()
        self.smg.wait(10)
        self.smg_log.close()
        self.decode.stop()
        self.prefill.stop()


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pd]:
    saved = {k: os.environ.get(k) for k in PD_ENV}
    os.environ.update(PD_ENV)
    try:
        pair = Pd(tmp_path_factory.mktemp("pd"))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield pair
    pair.close()


@pytest.fixture(scope="module")
def unified() -> Iterator[Engine]:
    eng = Engine(num_pages=512, max_running_requests=16, page_size=16)
    yield eng
    eng.shutdown()


def test_gateway_outputs_equal_unified(pd: Pd, unified: Engine) -> None:
    client = openai.OpenAI(base_url=f"{pd.url}/v1", api_key="none", max_retries=0, timeout=120)
    prompt = "The capital of France is"
    ref = unified.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].text
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, n=2)
    assert [c.text for c in r.choices] == [ref, ref]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    messages = [{"role": "user", "content": "Name three colors."}]
    ids = unified.tokenizer.encode(unified.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    chat_ref = unified.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0].text
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, n=2)
    assert sorted(c.message.content for c in r.choices) == [chat_ref, chat_ref]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_ref
    text = httpx.get(f"{pd.prefill.url}/metrics", timeout=30).text
    sent = [ln for ln in text.splitlines() if ln.startswith("semipd:pd_kv_transfer_seconds_count")]
    assert sent and float(sent[0].split()[-1]) >= 6, text[-2000:]  # 2 + 1 + 2 + 1 requests' KV went out


def test_pd_instance_without_room_is_400(pd: Pd) -> None:
    for srv in (pd.prefill, pd.decode):
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_room", r.text


def test_random_disconnects_free_every_page(pd: Pd) -> None:
    rng = random.Random(0)

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": rng.randint(4, 24), "temperature": 0,
                "stream": True}
        cut = rng.randint(0, 6)  # chunks read before the client goes away (0: right after the headers)
        try:
            with httpx.stream("POST", f"{pd.url}/v1/completions", json=body, timeout=60) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= cut and i % 2 == 0:
                        break
        except httpx.HTTPError:
            pass

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, range(50)))
    for srv in (pd.prefill, pd.decode):
        _wait(lambda srv=srv: pd.pages_used(srv) == (0, ""), f"every page free on {srv.url}", 90)
    assert pd._serves()  # a later request is fine


def test_prefill_killed_fails_requests_then_recovers(pd: Pd) -> None:
    body = {"model": MODEL, "prompt": "Tell me a long story about a dragon. " * 8, "max_tokens": 8}
    port = pd.prefill.port
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:  # requests in flight when the prefill dies
        t0 = time.monotonic()
        futs = [ex.submit(httpx.post, f"{pd.url}/v1/completions", json={**body, "max_tokens": 64}, timeout=60)
                for _ in range(4)]
        _wait(lambda: pd.pages_used(pd.decode)[0] > 0 or all(f.done() for f in futs), "requests in flight", 30)
        pd.prefill.proc.kill()  # the core process follows its parent (ppid watch)
        for f in futs:
            f.result()  # each one ends (success if it got its KV before the kill, else an error): no hang
        assert time.monotonic() - t0 < 45
    pd.prefill.proc.wait(10)
    t0 = time.monotonic()
    r = httpx.post(f"{pd.url}/v1/completions", json=body, timeout=60)
    assert r.status_code >= 500, r.text  # a later request fails cleanly while the prefill is gone
    assert time.monotonic() - t0 < 30
    # the decode side holds nothing for it
    _wait(lambda: pd.pages_used(pd.decode) == (0, ""), "decode pages free", 60)
    pd.prefill.stop()
    pd.prefill = pd.start_prefill(port)
    _wait(pd._serves, "requests to succeed again", 120)
