"""Server-sent events framing: one `data: <json>\\n\\n` event per chunk, `data: [DONE]\\n\\n` at the end.

JSON is encoded compactly on one line (msgspec never emits raw newlines inside a string), so a payload can never
break the `\\n\\n` event boundary."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: Any) -> bytes:
    """Frame one JSON-serialisable object (dict, list, msgspec Struct) as an SSE data event."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its event generator, even when the client went away mid-send:
    the generator's cleanup (aborting the engine request) must not wait for garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return SSEResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def parse_sse(raw: bytes | str) -> list[str]:
    """Split an SSE body into its data payloads (for clients and tests); raises ValueError on bad framing."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text and not text.endswith("\n\n"):
        raise ValueError("SSE body does not end with a blank line")
    out = []
    for event in text.split("\n\n")[:-1]:
        lines = event.split("\n")
        if len(lines) != 1 or not lines[0].startswith("data: "):
            raise ValueError(f"malformed SSE event: {event!r}")
        out.append(lines[0][len("data: ") :])
    return out
