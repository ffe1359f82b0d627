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
from semipd_server.help_format import HelpFormatter
from semipd_server.lifecycle import EXIT_CORE_DIED, Lifecycle
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


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= v <= 65535:  # the OS would take it modulo 65536 and listen somewhere else
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _add_knob(group: argparse._ArgumentGroup, ck: CliKnob) -> None:
    k = ck.knob
    metavar = k.flags[0].lstrip("-").upper().replace("-", "_")
    if ck.value_type == "bool":
        group.add_argument(*k.flags, dest=ck.name, action="store_false" if k.invert else "store_true", help=k.help)
    elif k.choices:
        group.add_argument(*k.flags, dest=ck.name, choices=list(k.choices), default=ck.default, help=k.help)
    elif ck.value_type in ("int", "float"):
        kind = int if ck.value_type == "int" else float
        group.add_argument(*k.flags, dest=ck.name, type=_number(kind, ck.name, k), default=ck.default, help=k.help,
                           metavar=metavar)
    else:
        group.add_argument(*k.flags, dest=ck.name, default=ck.default, help=k.help, metavar=metavar)


def build_parser() -> argparse.ArgumentParser:
    """Engine flags come from the engine's config knobs (semipd_runtime.config): each is written once there."""
    p = argparse.ArgumentParser(
        prog="semipd-server",
        formatter_class=HelpFormatter,
        description="OpenAI-compatible server for semipd (semi-disaggregated prefill/decode on one GPU).",
    )
    groups = {"model": p.add_argument_group("model"), "http": p.add_argument_group("HTTP"),
              "sched": p.add_argument_group("scheduling and memory"),
              "pd": p.add_argument_group("prefill/decode disaggregation"),
              "parallel": p.add_argument_group("parallelism")}
    for ck in cli_knobs():
        _add_knob(groups[ck.knob.group], ck)
    p.set_defaults(sm_partition=None)  # unset: chosen from the device at start (sm_partition_for)
    groups["model"].add_argument(
        "--served-model-name", nargs="+", default=None, metavar="NAME",
        help="model name(s) clients may send, all listed in /v1/models; the first names the model in responses "
        "and metrics (default: the model's)")
    groups["model"].add_argument("--trust-remote-code", action="store_true",
                                 help="accepted for vLLM/SGLang compatibility: semipd never runs a model's own code")
    h = groups["http"]
    h.add_argument("--host", default="127.0.0.1", help="address to bind")
    h.add_argument("--port", type=_port, default=30000, help="port to bind (0: any free port, logged at startup)")
    h.add_argument(
        "--api-key",
        default=os.environ.get("SEMIPD_API_KEY") or None,
        help="require 'Authorization: Bearer <key>' on the API routes (default: $SEMIPD_API_KEY; unset or "
        "empty: off)",
    )
    h.add_argument(
        "--metrics-auth", action="store_true", help="require the API key on /metrics too (/health stays open)"
    )
    h.add_argument(
        "--max-request-bytes",
        type=_positive,
        default=8 << 20,
        help="largest request body accepted; a larger one gets 413 before the rest of it is read",
    )
    h.add_argument(
        "--restart-core",
        action="store_true",
        help="when the engine core dies, start a new one in place (default: fail in-flight requests and exit "
        "with code 3, for a supervisor to restart the server)",
    )
    h.add_argument(
        "--core-unhealthy-timeout",
        type=_non_negative_float,
        default=30.0,
        help="seconds an engine core may stay alive but unhealthy (a semi-pd prefill worker gone) before it "
        "counts as dead (exit 3, or --restart-core); 0: never",
    )
    h.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to let in-flight requests finish after SIGINT/SIGTERM; then each one still running is "
        "answered with 503 (a stream: an error event and [DONE]) and aborted",
    )
    h.add_argument("--log-requests", action="store_true", help="write an access log line per request")
    h.add_argument("--enable-metrics", action="store_true",
                   help="accepted for vLLM/SGLang compatibility: /metrics is always served")
    groups["pd"].add_argument("--enable-semi-pd", action="store_true",
                              help="same as --mode semi-pd (Semi-PD's flag)")
    groups["pd"].add_argument("--prefill-only", action="store_const", const="prefill", dest="disaggregation_mode",
                              help="same as --disaggregation-mode prefill")
    groups["pd"].add_argument("--decode-only", action="store_const", const="decode", dest="disaggregation_mode",
                              help="same as --disaggregation-mode decode")
    p.add_argument("--log-level", type=str.lower, choices=["debug", "info", "warning", "error", "critical"],
                   default="info", help="log verbosity (any case)")
    return p


def sm_partition_for(args: argparse.Namespace, cuda_available: bool) -> str:
    """--sm-partition, or when it is not given: `green` for semi-pd on a CUDA device (`none` would give the two
    workers no isolation at all), `none` elsewhere."""
    if args.sm_partition is not None:
        return str(args.sm_partition)
    semi_pd = args.enable_semi_pd or args.mode == "semi-pd"
    on_gpu = cuda_available and not str(args.device or "").startswith("cpu")
    choice = "green" if semi_pd and on_gpu else "none"
    if semi_pd:
        log.info("semi-pd without --sm-partition: using %s (%s)", choice,
                 "a CUDA device: green contexts give each worker its SMs" if on_gpu else "no CUDA device")
    return choice


def engine_kwargs(args: argparse.Namespace, cuda_available: bool = False) -> dict[str, Any]:
    """Engine(...) keyword arguments from the CLI (every config knob with a flag); the core always runs in its own
    process behind the server."""
    kw = {ck.name: getattr(args, ck.name) for ck in cli_knobs()}
    if args.enable_semi_pd:
        kw["mode"] = "semi-pd"
    kw["sm_partition"] = sm_partition_for(args, cuda_available)
    kw["disaggregation_host"] = args.host  # the bootstrap server and the transfer engine listen beside the API
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


async def serve(
    engine: ServedEngine, args: argparse.Namespace, sock: socket.socket,
    make_engine: Callable[[], ServedEngine] | None = None,
) -> int:
    """Serve until drained (signal) or the engine core dies; returns the process exit code."""
    app = build_app(
        engine,
        args.served_model_name,
        args.api_key,
        page_size=args.page_size,
        max_request_bytes=args.max_request_bytes,
        metrics_auth=args.metrics_auth,
        on_core_death="restart" if args.restart_core else "exit",
    )
    state: ServerState = app.state.server
    config = HypercornConfig()
    url = _url(sock)
    config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (and closes) the listening socket from here on
    config.graceful_timeout = 5.0
    config.accesslog = logging.getLogger("semipd_server.access") if args.log_requests else None
    config.errorlog = logging.getLogger("hypercorn")
    life = Lifecycle(
        state, make_engine if args.restart_core else None, unhealthy_timeout_s=args.core_unhealthy_timeout
    )
    loop = asyncio.get_running_loop()

    tasks: set[asyncio.Task[None]] = set()  # the drains started by signals (held: the loop keeps weak refs)

    def on_signal(name: str) -> None:
        if state.draining:  # a second signal: answer what is in flight now and stop
            log.warning("%s again: stopping now", name)
            tasks.add(loop.create_task(life.drain(0.0)))
            return
        log.info("%s: draining (%d requests in flight; new ones get 503)", name, state.in_flight)
        state.start_draining(name)
        tasks.add(loop.create_task(life.drain(args.drain_timeout)))

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
    log.info(
        "listening on %s (OpenAI API under /v1; auth %s; bodies up to %d bytes; if the engine core dies: %s)",
        url,
        "off" if not args.api_key else "on, /metrics too" if args.metrics_auth else "on",
        args.max_request_bytes,
        "restart it" if args.restart_core else f"exit {EXIT_CORE_DIED}",
    )
    watch = loop.create_task(life.watch_core())
    try:
        await hypercorn_serve(app, config, shutdown_trigger=life.shutdown.wait)  # type: ignore[arg-type]
    finally:
        watch.cancel()
        state.prep.close()
        if state.engine is not engine:  # a core restarted in place; the caller stops the original
            state.engine.shutdown()
    log.info("HTTP server stopped")
    return life.exit_code


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
    import torch

    from semipd_runtime import Engine  # heavy (torch): after argument errors have had their chance

    # until the event loop takes over: SIGTERM unwinds like Ctrl-C, so a half-started engine core is stopped too
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log.info("starting engine core (model %s)", args.model_path or "default SmolLM2-135M-Instruct")
    kwargs = engine_kwargs(args, torch.cuda.is_available())

    def make_engine() -> Engine:
        return Engine(**kwargs)

    try:
        engine = make_engine()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        log.error("engine failed to start: %s", e)
        sock.close()
        return 2
    code = 1
    try:
        code = asyncio.run(serve(engine, args, sock, make_engine))
    finally:
        # a late Ctrl-C (or `uv run` passing one on) must not cut the engine's shutdown short and leave children
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _already_stopping)
        log.info("stopping engine core")
        engine.shutdown()
        log.info("bye (exit code %d)", code)
    return code


def _already_stopping(signum: int, _frame: object) -> None:
    log.warning("%s: already stopping the engine core", signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
