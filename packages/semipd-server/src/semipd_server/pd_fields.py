"""The bootstrap fields smg's PD mode adds to a request (`bootstrap_host`, `bootstrap_port`, `bootstrap_room`;
arrays for batched requests), turned into one (host, port, room) per prompt. A PD instance needs them (400 naming
`bootstrap_room` without); any other instance accepts and ignores them."""

from __future__ import annotations

import logging
from typing import Any

from semipd_server.errors import bad_request
from semipd_server.generation import Bootstrap

log = logging.getLogger(__name__)


def _pick(value: Any, i: int, n: int, name: str) -> Any:
    if not isinstance(value, list):
        return value
    if not value:
        raise bad_request(f"{name} must not be an empty array", param=name)
    # one per prompt; smg also sends one per completion of a single-prompt chat request (n > 1): both
    # instances read the same body, so the first room names that prompt on both
    return value[i] if len(value) == n else value[0]


def bootstraps(engine: Any, req: Any, n_prompts: int) -> list[Bootstrap | None] | None:
    """Per prompt, its (host, port, room) on a PD instance; None elsewhere."""
    mode = getattr(engine, "disaggregation_mode", "null")
    if mode == "null":
        if req.bootstrap_room is not None:
            log.debug("bootstrap_room %r ignored: this server is not a PD instance", req.bootstrap_room)
        return None
    if req.bootstrap_room is None:
        raise bad_request(f"this is a PD {mode} instance: bootstrap_room is required (send requests through "
                          "smg --pd-disaggregation, which adds it)", param="bootstrap_room")
    out: list[Bootstrap | None] = []
    for i in range(n_prompts):
        room = _pick(req.bootstrap_room, i, n_prompts, "bootstrap_room")
        host = _pick(req.bootstrap_host, i, n_prompts, "bootstrap_host") or "127.0.0.1"
        port = _pick(req.bootstrap_port, i, n_prompts, "bootstrap_port")
        if not isinstance(room, int) or isinstance(room, bool):
            raise bad_request(f"bootstrap_room must be an integer, got {room!r}", param="bootstrap_room")
        out.append((host, port, room))
    return out
