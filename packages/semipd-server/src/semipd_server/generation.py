"""Driving engine streams for an HTTP request: start eagerly (so a bad request or a full queue is answered with
its status before any 200 header goes out), merge the streams of a batched prompt, abort on disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from semipd_runtime import RequestOutput, SamplingParams
from semipd_runtime.errors import SemipdError
from semipd_server.engine_protocol import Bootstrap, Prompt, ServedEngine
from semipd_server.errors import ApiError, from_engine_error


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Generation:
    """One engine request (one prompt with its n completions), already submitted."""

    def __init__(
        self,
        engine: ServedEngine,
        request_id: str,
        stream: AsyncIterator[RequestOutput],
        first: asyncio.Future[RequestOutput],
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self._first: asyncio.Future[RequestOutput] | None = first
        self.finished = False
        self.last: RequestOutput | None = None

    @classmethod
    async def start(
        cls, engine: ServedEngine, prompt: Prompt, params: SamplingParams, request_id: str,
        bootstrap: Bootstrap | None = None,
    ) -> Generation:
        stream = engine.stream(prompt, params, request_id, bootstrap)

        async def first_output() -> RequestOutput:
            return await stream.__anext__()

        first = asyncio.ensure_future(first_output())
        # The task runs now, up to the engine's first wait: by then the request is submitted or was refused
        # (Engine.stream validates and enqueues synchronously before it awaits anything).
        await asyncio.sleep(0)
        if first.done() and first.exception() is not None:
            raise _api_error(first.exception())  # type: ignore[arg-type]
        return cls(engine, request_id, stream, first)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                out = await first
                yield self._note(out)
            while not self.finished:
                out = await self._stream.__anext__()
                yield self._note(out)
        except StopAsyncIteration:
            self.finished = True
        except SemipdError as e:
            raise from_engine_error(e) from None

    def _note(self, out: RequestOutput) -> RequestOutput:
        self.last = out
        self.finished = out.finished
        return out

    async def close(self) -> None:
        """Abort if unfinished (client gone, error elsewhere) and release the engine stream."""
        if self._first is not None and not self._first.done():
            self._first.cancel()
            with contextlib.suppress(BaseException):
                await self._first  # let the engine stream unwind before it is closed below
        if not self.finished:
            self.engine.abort(self.request_id)
        with contextlib.suppress(Exception):
            await self._stream.aclose()  # type: ignore[attr-defined]


def _api_error(e: BaseException) -> BaseException:
    return from_engine_error(e) if isinstance(e, SemipdError) else e


async def start_all(
    engine: ServedEngine, prompts: list[Prompt], params: SamplingParams, base_id: str,
    bootstraps: list[Bootstrap | None] | None = None,
) -> list[Generation]:
    """Submit every prompt of a batch; if one is refused, abort those already submitted."""
    gens: list[Generation] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            boot = bootstraps[i] if bootstraps else None
            gens.append(await Generation.start(engine, prompt, params, rid, boot))
    except BaseException as e:
        for g in gens:
            await g.close()
        # a PD prefill: the decode side waits for these rooms too; tell it now (the refused one was, by submit)
        for boot in (bootstraps or [])[len(gens) + 1:]:
            if boot is not None:
                engine.reject_room(boot, params.n, f"an earlier prompt of the batch was refused: {e}")
        raise
    return gens


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every generation as they arrive; closes all of them on exit."""
    try:
        if len(gens) == 1:
            async for out in gens[0].outputs():
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, g: Generation) -> None:
            try:
                async for out in g.outputs():
                    await queue.put((i, out))
                await queue.put((i, None))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(gens)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for g in gens:
            await g.close()


async def wait_disconnected(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    """Returns when the client has gone (ASGI http.disconnect); the request body must be read already."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(work: Awaitable[Any],
                               receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> Any:
    """Await `work` unless the client disconnects first; then cancel it (its cleanup aborts the requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "client disconnected", code="client_closed_request")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
