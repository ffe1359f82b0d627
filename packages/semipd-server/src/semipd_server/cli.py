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

from semipd_server.app import build_app
from semipd_server.lifecycle import EXIT_CORE_DIED, Lifecycle
from semipd_server.state import ServerState

log = logging.getLogger("semipd_server")


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already explains the default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semipd-server",
        formatter_class=_HelpFormatter,
        description="OpenAI-compatible server for semipd (semi-disaggregated prefill/decode on one GPU).",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model-path",
        default=None,
        help="Hugging Face model directory; default: the bundled SmolLM2-135M-Instruct",
    )
    m.add_argument(
        "--served-model-name", default=None, help="model name clients must send (default: the model's)"
    )
    m.add_argument(
        "--context-length", type=_positive, default=None, help="max tokens per request (prompt+output)"
    )
    m.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights/activations dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    m.add_argument(
        "--load-format",
        choices=["auto", "dummy"],
        default="auto",
        help="auto: the model directory's safetensors; dummy: random weights at its config's shapes (benchmarks)",
    )
    m.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to bind")
    h.add_argument(
        "--port", type=int, default=30000, help="port to bind (0: any free port, logged at startup)"
    )
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
    s = p.add_argument_group("scheduling and memory")
    s.add_argument("--max-running-requests", type=_positive, default=64, help="requests decoded together")
    s.add_argument(
        "--max-queued-requests",
        type=_non_negative,
        default=None,
        help="requests allowed to wait beyond the running ones; more get HTTP 429 (default: no limit)",
    )
    s.add_argument("--chunked-prefill-size", type=_positive, default=512,
                   help="unified mode: prefill tokens per step (mixed with the decode batch)")
    s.add_argument("--max-prefill-tokens", type=_positive, default=8192,
                   help="semi-pd: prompt tokens per prefill batch and forward (a longer prompt runs in chunks of it)")
    s.add_argument("--page-size", type=_positive, default=16, help="tokens per KV cache page")
    s.add_argument("--num-pages", type=_positive, default=None, help="KV pages (default: from memory)")
    s.add_argument(
        "--mem-fraction-static",
        type=float,
        default=0.85,
        help="fraction of GPU memory for weights + KV cache",
    )
    s.add_argument(
        "--cuda-graph-max-bs",
        type=_positive,
        default=None,
        help="largest decode batch run as a CUDA graph (default: --max-running-requests, at most 256)",
    )
    s.add_argument("--disable-cuda-graph", action="store_true", help="run decode steps eagerly (CUDA)")
    s.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="resolve each step before scheduling the next (default: schedule step N+1 while N runs on the GPU)",
    )
    s.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="do not share cached prompt prefixes between requests (radix prefix cache over the KV pages)",
    )
    d = p.add_argument_group("prefill/decode disaggregation")
    d.add_argument(
        "--mode",
        choices=["unified", "semi-pd"],
        default="unified",
        help="unified: chunked prefill mixed with decode; semi-pd: separate prefill and decode workers",
    )
    d.add_argument("--enable-semi-pd", action="store_true", help="same as --mode semi-pd (Semi-PD's flag)")
    d.add_argument(
        "--sm-partition",
        choices=["none", "green", "mps"],
        default="none",
        help="how semi-pd confines each worker to its share of SMs",
    )
    d.add_argument("--prefill-sm-percent", type=int, default=None, help="prefill worker's SM share (semi-pd)")
    d.add_argument("--decode-sm-percent", type=int, default=None, help="decode worker's SM share (semi-pd)")
    d.add_argument(
        "--partition-policy",
        choices=["static", "slo"],
        default="static",
        help="static: keep the SM split; slo: move it at run time to keep TTFT/TPOT within their SLOs (semi-pd)",
    )
    d.add_argument("--slo-ttft-ms", type=_positive_float, default=1000.0, help="TTFT target of the slo policy")
    d.add_argument("--slo-tpot-ms", type=_positive_float, default=50.0, help="TPOT target of the slo policy")
    d.add_argument(
        "--repartition-interval-s",
        type=_positive_float,
        default=2.0,
        help="how often the slo policy re-decides the split (seconds)",
    )
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info", help="log verbosity"
    )
    return p


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Engine(...) keyword arguments from the CLI; the core always runs in its own process behind the server."""
    return {
        "mode": "semi-pd" if args.enable_semi_pd else args.mode,
        "max_running_requests": args.max_running_requests,
        "max_queued_requests": args.max_queued_requests,
        "chunked_prefill_size": args.chunked_prefill_size,
        "max_prefill_tokens": args.max_prefill_tokens,
        "page_size": args.page_size,
        "num_pages": args.num_pages,
        "mem_fraction_static": args.mem_fraction_static,
        "max_model_len": args.context_length,
        "dtype": args.dtype,
        "device": args.device,
        "core": "process",
        "sm_partition": args.sm_partition,
        "prefill_sm_percent": args.prefill_sm_percent,
        "decode_sm_percent": args.decode_sm_percent,
        "cuda_graph_max_bs": args.cuda_graph_max_bs,
        "disable_cuda_graph": args.disable_cuda_graph,
        "disable_overlap_schedule": args.disable_overlap_schedule,
        "load_format": args.load_format,
        "partition_policy": args.partition_policy,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
        "repartition_interval_s": args.repartition_interval_s,
        "enable_radix_cache": not args.disable_radix_cache,
    }


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
    engine: Any, args: argparse.Namespace, sock: socket.socket, make_engine: Callable[[], Any] | None = None
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

    def on_signal(name: str) -> None:
        if state.draining:  # a second signal: answer what is in flight now and stop
            log.warning("%s again: stopping now", name)
            loop.create_task(life.drain(0.0))
            return
        log.info("%s: draining (%d requests in flight; new ones get 503)", name, state.in_flight)
        state.start_draining(name)
        loop.create_task(life.drain(args.drain_timeout))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    stats = engine.stats()
    log.info(
        "model %s (%s mode, context %d tokens), %d KV pages of %d tokens, max running %d, max queued %s",
        state.model_name,
        engine.mode,
        engine.max_model_len,
        stats.get("pages_total", 0),
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
    from semipd_runtime import Engine  # heavy (torch): after argument errors have had their chance

    # until the event loop takes over: SIGTERM unwinds like Ctrl-C, so a half-started engine core is stopped too
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log.info("starting engine core (model %s)", args.model_path or "default SmolLM2-135M-Instruct")
    def make_engine() -> Engine:
        return Engine(args.model_path, **engine_kwargs(args))

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
        log.info("stopping engine core")
        engine.shutdown()
        log.info("bye (exit code %d)", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
