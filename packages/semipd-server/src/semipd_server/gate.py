"""The middleware around every HTTP request: API key (401), body size (413), drain and restart gates (503),
in-flight accounting, and a real answer for every failure (OpenAI error body, counted by status): an unexpected
exception becomes a counted 500 here instead of escaping to Starlette's outer handler, and a request cut off by
the drain timeout or a core restart gets a 503 (or, on a stream that already sent its 200, an error event and
`[DONE]`)."""

from __future__ import annotations

import asyncio
import hmac
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from semipd_server.errors import ApiError
from semipd_server.sse import DONE
from semipd_server.state import ServerState

log = logging.getLogger(__name__)

# requests that run generation: refused while draining, counted as in flight, cut off by the drain timeout
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/generate"})
# never need the API key (probes and scrapers), see metrics_auth
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, seen: int | None = None) -> None:
        size = f"is {seen} bytes" if seen is not None else "is longer"
        super().__init__(413, f"request body {size}; this server accepts at most {limit} bytes "
                              f"(--max-request-bytes)", code="request_too_large")


def bearer_matches(headers: list[tuple[bytes, bytes]], key: str) -> bool:
    """Constant-time comparison of raw bytes: any header byte is fine (hmac refuses non-ASCII str)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())
    return False


class _Exchange:
    """What has gone out on one response, so that a failure can still be answered properly."""

    def __init__(self, send: Send, state: ServerState) -> None:
        self._send = send
        self.state = state
        self.started = False
        self.finished = False
        self.event_stream = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] >= 400:
                self.state.metrics.error(message["status"])
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            self.event_stream = ctype.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def fail(self, error: ApiError, scope: Scope, receive: Receive) -> None:
        """Answer with `error`: as the whole response, or in-band when an event stream is already open."""
        if not self.started:
            await error.response()(scope, receive, self.send)
        elif self.event_stream and not self.finished:
            self.state.metrics.error(error.status)
            payload = b"data: " + error.sse_payload().encode() + b"\n\n" + DONE
            await self.send({"type": "http.response.body", "body": payload, "more_body": False})
        elif not self.finished:  # a JSON body half sent: nothing honest can follow; end it
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class GateMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(send, self.state)
        refusal = self._refusal(scope)
        if refusal is not None:
            await exchange.fail(refusal, scope, receive)
            return
        generation = scope["path"] in GENERATION_PATHS
        task = asyncio.current_task()
        if generation:
            self.state.enter(task)
        try:
            await self.app(scope, self._limited(receive), exchange.send)
        except asyncio.CancelledError:
            error = self.state.cut_off_error
            if not (generation and self.state.was_cut_off(task)) or error is None:
                raise  # the client or the server stopping: not ours to answer
            assert task is not None
            task.uncancel()  # the cancel was ours (drain timeout, core restart); this task goes on to answer
            await exchange.fail(error, scope, receive)
        except ApiError as e:  # raised outside a route (e.g. a body limit hit in a streaming read)
            await exchange.fail(e, scope, receive)
        except Exception as e:  # every failure gets an answer that the metrics count
            log.exception("unhandled error on %s %s", scope.get("method"), scope["path"], exc_info=e)
            await exchange.fail(ApiError(500, f"internal server error: {type(e).__name__}"), scope, receive)
        finally:
            if generation:
                self.state.leave(task)

    def _refusal(self, scope: Scope) -> ApiError | None:
        state, path = self.state, scope["path"]
        needs_key = path not in OPEN_PATHS or (path == "/metrics" and state.metrics_auth)
        if state.api_key is not None and needs_key and not bearer_matches(scope["headers"], state.api_key):
            return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        length = _content_length(scope)
        if length is not None and length > state.max_request_bytes:
            return BodyTooLarge(state.max_request_bytes, length)  # before a byte of the body is read
        if path in GENERATION_PATHS:
            if state.draining:
                return ApiError(503, "server is shutting down; not accepting new requests", code="draining")
            if state.restarting is not None:
                return ApiError(503, f"engine core is restarting ({state.restarting})", code="engine_restarting")
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that stops a body (chunked, or longer than it said) once it passes the limit."""
        limit, seen = self.state.max_request_bytes, 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return receive_limited


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed one before the app sees it
    return None
