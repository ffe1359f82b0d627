"""`semipd-server`: build the engine (its core in a child process), serve the app on Hypercorn, drain on
SIGINT/SIGTERM (new requests get 503, in-flight ones finish), then stop the engine so no child is left behind."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from semipd_runtime.config import CliKnob, cli_knobs
from semipd_runtime.knobs import Knob, check_value

from semipd_server.app import build_app
from semipd_server.engine_protocol import ServedEngine
from semipd_server.state import ServerState

log = logging.getLogger("semipd_server")


def _number(kind: type, name: str, k: Knob) -> Callable[[str], Any]:
    """An argparse type: parse, then the knob's own bounds (the message names the flag's knob)."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            check_value(name, k, v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name} ")) from None
        return v

    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already explains the default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.const is False:
            return text
        return f"{text} (default: {action.default})"


def _add_knob(group: argparse._ArgumentGroup, ck: CliKnob) -> None:
    k = ck.knob
    meta = {"metavar": k.flags[0].lstrip("-").upper().replace("-", "_")}
    if ck.value_type == "bool":
        group.add_argument(*k.flags, dest=ck.name, action="store_false" if k.invert else "store_true", help=k.help)
    elif k.choices:
        group.add_argument(*k.flags, dest=ck.name, choices=list(k.choices), default=ck.default, help=k.help)
    elif ck.value_type in ("int", "float"):
        kind = int if ck.value_type == "int" else float
        group.add_argument(*k.flags, dest=ck.name, type=_number(kind, ck.name, k), default=ck.default, help=k.help,
                           **meta)
    else:
        group.add_argument(*k.flags, dest=ck.name, default=ck.default, help=k.help, **meta)


def build_parser() -> argparse.ArgumentParser:
    """Engine flags come from the engine's config knobs (semipd_runtime.config): each is written once there."""
    p = argparse.ArgumentParser(
        prog="semipd-server",
        formatter_class=_HelpFormatter,
        description="OpenAI-compatible server for semipd (semi-disaggregated prefill/decode on one GPU).",
    )
    groups = {"model": p.add_argument_group("model"), "http": p.add_argument_group("HTTP"),
              "sched": p.add_argument_group("scheduling and memory"),
              "pd": p.add_argument_group("prefill/decode disaggregation"),
              "parallel": p.add_argument_group("parallelism")}
    for ck in cli_knobs():
        _add_knob(groups[ck.knob.group], ck)
    groups["model"].add_argument(
        "--served-model-name", default=None, help="model name clients must send (default: the model's)")
    h = groups["http"]
    h.add_argument("--host", default="127.0.0.1", help="address to bind")
    h.add_argument("--port", type=int, default=30000, help="port to bind (0: any free port, logged at startup)")
    h.add_argument(
        "--api-key",
        default=os.environ.get("SEMIPD_API_KEY"),
        help="require 'Authorization: Bearer <key>' on the API routes (default: $SEMIPD_API_KEY, else off)",
    )
    h.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to let in-flight requests finish after SIGINT/SIGTERM before aborting them",
    )
    h.add_argument("--log-requests", action="store_true", help="write an access log line per request")
    groups["pd"].add_argument("--enable-semi-pd", action="store_true",
                              help="same as --mode semi-pd (Semi-PD's flag)")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info", help="log verbosity"
    )
    return p


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Engine(...) keyword arguments from the CLI (every config knob with a flag); the core always runs in its own
    process behind the server."""
    kw = {ck.name: getattr(args, ck.name) for ck in cli_knobs()}
    if args.enable_semi_pd:
        kw["mode"] = "semi-pd"
    kw["core"] = "process"
    return kw


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind here (not in Hypercorn) so that port 0 works and the real address can be logged."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(engine: ServedEngine, args: argparse.Namespace, sock: socket.socket) -> None:
    app = build_app(engine, args.served_model_name, args.api_key, page_size=args.page_size)
    state: ServerState = app.state.server
    config = HypercornConfig()
    url = _url(sock)
    config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (and closes) the listening socket from here on
    config.graceful_timeout = 5.0
    config.accesslog = logging.getLogger("semipd_server.access") if args.log_requests else None
    config.errorlog = logging.getLogger("hypercorn")
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        if not await state.wait_idle(args.drain_timeout):
            log.warning(
                "drain timeout (%.0fs): %d requests still in flight are aborted",
                args.drain_timeout,
                state.in_flight,
            )
        shutdown.set()

    def on_signal(name: str) -> None:
        if state.draining:  # a second signal: stop waiting
            log.warning("%s again: stopping now", name)
            shutdown.set()
            return
        log.info("%s: draining (%d requests in flight; new ones get 503)", name, state.in_flight)
        state.start_draining()
        loop.create_task(drain())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    stats = engine.stats()
    log.info(
        "model %s (%s mode, context %d tokens), %d KV pages of %d tokens, max running %d, max queued %s",
        state.model_name,
        engine.mode,
        engine.max_model_len,
        stats.pages_total,
        args.page_size,
        args.max_running_requests,
        "unlimited" if args.max_queued_requests is None else args.max_queued_requests,
    )
    log.info("listening on %s (OpenAI API under /v1; auth %s)", url, "on" if args.api_key else "off")
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
    log.info("HTTP server stopped")


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.partition_policy == "slo" and args.mode != "semi-pd" and not args.enable_semi_pd:
        parser.error("--partition-policy slo needs --mode semi-pd (or --enable-semi-pd)")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        log.error("cannot bind %s:%d: %s", args.host, args.port, e)
        return 2
    from semipd_runtime import Engine  # heavy (torch): after argument errors have had their chance

    # until the event loop takes over: SIGTERM unwinds like Ctrl-C, so a half-started engine core is stopped too
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log.info("starting engine core (model %s)", args.model_path or "default SmolLM2-135M-Instruct")
    try:
        engine = Engine(**engine_kwargs(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        log.error("engine failed to start: %s", e)
        sock.close()
        return 2
    try:
        asyncio.run(serve(engine, args, sock))
    finally:
        log.info("stopping engine core")
        engine.shutdown()
        log.info("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
