"""Lifecycle over the fake engine: a dead core makes the server drain and exit with code 3, or with a factory
(--restart-core) get a new engine while /health and new requests say `engine_restarting`; the drain timeout
stops the server after answering what it cut off. (Through the real server: tests/test_server_recovery.py.)"""

from __future__ import annotations

import asyncio
import threading

import httpx
from server_fake_engine import FakeEngine
from test_server_app import assert_error

from semipd_runtime.errors import EngineDeadError
from semipd_server.app import build_app
from semipd_server.lifecycle import EXIT_CORE_DIED, Lifecycle


async def until(cond: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_dead_core_drains_and_exits_3() -> None:
    eng = FakeEngine()
    app = build_app(eng)
    state = app.state.server

    async def main() -> None:
        life = Lifecycle(state, poll_s=0.01)
        watch = asyncio.create_task(life.watch_core())
        await asyncio.sleep(0.05)
        assert not life.shutdown.is_set()  # alive: nothing happens
        eng.dead = True
        await asyncio.wait_for(life.shutdown.wait(), 10)
        await watch
        assert life.exit_code == EXIT_CORE_DIED and state.draining
        assert state.drain_reason == "engine core failed: engine core process died"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert_error(await c.post("/v1/completions", json={"prompt": "x"}), 503, None, "draining")

    asyncio.run(main())


def test_restart_core_swaps_in_a_new_engine() -> None:
    old, new = FakeEngine(), FakeEngine()
    release = threading.Event()

    def make_engine() -> FakeEngine:
        assert release.wait(10)  # a start takes a while: /health and new requests must say so meanwhile
        return new

    app = build_app(old, on_core_death="restart")
    state = app.state.server

    async def main() -> None:
        life = Lifecycle(state, make_engine, poll_s=0.01)
        watch = asyncio.create_task(life.watch_core())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/health")).json()["on_core_death"] == "restart"
            old.dead = True
            await until(lambda: state.restarting is not None)
            assert_error(await c.get("/health"), 503, None, "engine_restarting")
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert_error(r, 503, None, "engine_restarting")
            assert r.headers["retry-after"] == "1"
            release.set()
            await until(lambda: state.engine is new)
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2})
            assert r.status_code == 200 and new.finished and not old.finished
        assert life.restarts == 1 and not life.shutdown.is_set() and life.exit_code == 0
        life.shutdown.set()
        await asyncio.wait_for(watch, 5)

    asyncio.run(main())


def test_drain_timeout_stops_the_server_after_answering() -> None:
    eng = FakeEngine()
    eng.gate = asyncio.Event()  # never set: the request can only be cut off
    app = build_app(eng)
    state = app.state.server

    async def main() -> None:
        life = Lifecycle(state)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            req = asyncio.create_task(c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3}))
            await until(lambda: state.in_flight == 1 and eng.active)
            state.start_draining("SIGTERM")
            await life.drain(0.05)
            assert life.shutdown.is_set() and state.in_flight == 0
            assert_error(await req, 503, None, "drain_timeout")

    asyncio.run(main())


class SickEngine(FakeEngine):
    """Alive but unhealthy, as semi-PD is while its prefill worker is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.sick = False

    async def check_health(self) -> None:
        if self.sick:
            raise EngineDeadError("prefill worker died")


def test_unhealthy_past_the_timeout_counts_as_dead() -> None:
    eng = SickEngine()
    state = build_app(eng).state.server

    async def main() -> None:
        life = Lifecycle(state, poll_s=0.01, unhealthy_timeout_s=0.3)
        watch = asyncio.create_task(life.watch_core())
        eng.sick = True
        await asyncio.sleep(0.2)
        eng.sick = False  # back within the timeout (a worker restarted in place): nothing happens
        await asyncio.sleep(0.5)
        assert not life.shutdown.is_set()
        eng.sick = True
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(life.shutdown.wait(), 10)
        assert asyncio.get_running_loop().time() - started >= 0.3
        await watch
        assert life.exit_code == EXIT_CORE_DIED
        assert state.drain_reason.startswith("engine core failed: unhealthy for ")
        assert state.drain_reason.endswith("s: prefill worker died")

    asyncio.run(main())


def test_restarting_an_unhealthy_core_answers_its_requests() -> None:
    old, new = SickEngine(), FakeEngine()
    old.gate = asyncio.Event()  # its request never gets a token: it would wait forever on the stopped core
    app = build_app(old, on_core_death="restart")
    state = app.state.server

    async def main() -> None:
        life = Lifecycle(state, lambda: new, poll_s=0.01, unhealthy_timeout_s=0.1)
        watch = asyncio.create_task(life.watch_core())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            stuck = asyncio.create_task(c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3}))
            await until(lambda: state.in_flight == 1 and old.active)
            old.sick = True
            r = await asyncio.wait_for(stuck, 10)
            assert_error(r, 503, None, "engine_restarting")
            assert "unhealthy for" in r.json()["error"]["message"]
            await until(lambda: state.engine is new)
            assert old.aborted and old.dead  # its work aborted, then the old engine shut down
            assert (await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1})).status_code == 200
        life.shutdown.set()
        await asyncio.wait_for(watch, 5)

    asyncio.run(main())
