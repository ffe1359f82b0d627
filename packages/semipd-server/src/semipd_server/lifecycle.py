"""How the server process ends, or carries on: the graceful drain (SIGINT/SIGTERM) whose timeout still answers
every request it cuts off, and the watch on the engine core: when the core dies (or stays unhealthy past
`--core-unhealthy-timeout`) the server fails what is in flight and exits non-zero so that a supervisor restarts
it (as vLLM and SGLang do), or with `--restart-core` starts a new core in place."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from semipd_runtime.errors import SemipdError
from semipd_server.engine_protocol import ServedEngine
from semipd_server.errors import ApiError
from semipd_server.state import ServerState, drain_timeout_error

log = logging.getLogger("semipd_server")

EXIT_CORE_DIED = 3  # the process exit code after the engine core died (and was not restarted)
_UNWIND_S = 5.0  # how long cut-off requests get to send their answers before the HTTP server stops


class Lifecycle:
    def __init__(
        self,
        state: ServerState,
        make_engine: Callable[[], ServedEngine] | None = None,
        poll_s: float = 0.5,
        unhealthy_timeout_s: float = 0.0,
    ) -> None:
        self.state = state
        self.make_engine = make_engine  # set: --restart-core
        self.poll_s = poll_s
        # > 0: a core that is alive but unhealthy (a semi-PD prefill worker gone) that long counts as dead
        self.unhealthy_timeout_s = unhealthy_timeout_s
        self.shutdown = asyncio.Event()  # set: the HTTP server stops
        self.exit_code = 0
        self.restarts = 0

    async def drain(self, timeout_s: float) -> None:
        """Let in-flight requests finish; past `timeout_s`, answer each one still running (503, or an error event
        and [DONE] on a stream), abort its engine work, then stop the HTTP server."""
        if not await self.state.wait_idle(timeout_s):
            n = self.state.cut_off_in_flight(drain_timeout_error(timeout_s))
            log.warning(
                "drain timeout (%gs): %d requests still in flight; answering each with 503 (a stream: an error "
                "event and [DONE]) and aborting its engine work",
                timeout_s,
                n,
            )
            await self._unwind(n)
        self.shutdown.set()

    async def _unwind(self, n: int) -> None:
        if await self.state.wait_idle(_UNWIND_S):
            log.info("all %d cut-off requests answered", n)
        else:
            log.warning(
                "%d cut-off requests did not answer within %gs; their connections are closed",
                self.state.in_flight,
                _UNWIND_S,
            )

    async def watch_core(self) -> None:
        """Poll the engine core; on its death exit (code EXIT_CORE_DIED) or restart it (--restart-core)."""
        state = self.state
        unhealthy_since: float | None = None
        next_check = 0.0
        while not self.shutdown.is_set():
            await asyncio.sleep(self.poll_s)
            if state.draining:
                continue
            if state.engine.is_alive:
                now = time.monotonic()
                if self.unhealthy_timeout_s <= 0 or now < next_check:
                    continue
                next_check = now + min(2.0, self.unhealthy_timeout_s / 2)  # a round trip: not every poll
                problem = await _health_problem(state.engine)
                if problem is None:
                    unhealthy_since = None
                    continue
                unhealthy_since = unhealthy_since or now
                if now - unhealthy_since < self.unhealthy_timeout_s:
                    continue
                reason = f"unhealthy for {now - unhealthy_since:.0f}s: {problem}"
            else:
                reason = await _death_reason(state.engine)
            unhealthy_since = None
            if self.make_engine is None:
                await self._exit_for_supervisor(reason)
                return
            if not await self._restart(reason):
                return

    async def _exit_for_supervisor(self, reason: str) -> None:
        log.error(
            "engine core failed (%s): failing in-flight requests and exiting with code %d so that a supervisor "
            "restarts the server (--restart-core restarts the core in place instead)",
            reason,
            EXIT_CORE_DIED,
        )
        await self._exit(reason)

    async def _exit(self, reason: str) -> None:
        state = self.state
        self.exit_code = EXIT_CORE_DIED
        state.start_draining(f"engine core failed: {reason}")
        # a dead core already failed its requests (503, or an in-band error on streams); an unhealthy one may
        # still be decoding some: they cannot finish on a server that is going away
        if not await state.wait_idle(_UNWIND_S):
            error = ApiError(503, f"engine core failed ({reason}); the server is exiting", code="engine_dead")
            n = state.cut_off_in_flight(error)
            log.warning("%d requests still in flight; answering each with 503 and exiting", n)
            await self._unwind(n)
        self.shutdown.set()

    async def _restart(self, reason: str) -> bool:
        """Replace the dead engine; False (and the server exits) when the new one does not start."""
        state, loop = self.state, asyncio.get_running_loop()
        assert self.make_engine is not None
        state.restarting = reason
        log.error("engine core failed (%s): its requests fail with 503; restarting it (--restart-core)", reason)
        started = time.monotonic()
        # a dead core failed its requests itself; an unhealthy one would leave them waiting on a core we stop
        error = ApiError(503, f"engine core failed ({reason}) and is being restarted", code="engine_restarting")
        if n := state.cut_off_in_flight(error):
            await self._unwind(n)
        old = state.engine
        await loop.run_in_executor(None, old.shutdown)
        building = loop.run_in_executor(None, self.make_engine)
        try:
            new = await asyncio.shield(building)
        except asyncio.CancelledError:  # the server stops meanwhile: the engine still being built must not leak
            building.add_done_callback(_shutdown_if_built)
            raise
        except Exception as e:  # noqa: BLE001 - any failure to start means we cannot serve
            log.error("engine core restart failed (%s): exiting with code %d", e, EXIT_CORE_DIED)
            state.restarting = None
            await self._exit(reason)
            return False
        state.engine = new
        state.restarting = None
        self.restarts += 1
        log.info("engine core restarted in %.1fs (restart %d)", time.monotonic() - started, self.restarts)
        return True


async def _health_problem(engine: ServedEngine) -> str | None:
    """Why the core is unhealthy; None when healthy or while it replaces a worker in place (`recovering`: a
    replacement that never comes ready turns into a plain error after the core's own start timeout)."""
    try:
        await engine.check_health()
    except SemipdError as e:
        return None if engine.stats().recovering else e.message
    except Exception as e:  # noqa: BLE001 - any failure is the problem we report
        return repr(e)
    return None


async def _death_reason(engine: ServedEngine) -> str:
    try:  # a dead engine raises its death message at once
        await asyncio.get_running_loop().run_in_executor(None, engine.refresh_stats, 0.5)
    except SemipdError as e:
        return e.message
    except Exception as e:  # noqa: BLE001 - the message is all we want
        return repr(e)
    return "engine core is not alive"


def _shutdown_if_built(f: asyncio.Future[ServedEngine]) -> None:
    if not f.cancelled() and f.exception() is None:
        f.result().shutdown()
