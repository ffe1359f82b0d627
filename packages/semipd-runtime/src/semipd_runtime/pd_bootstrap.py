"""The prefill instance's bootstrap server (SGLang's design): a small HTTP server where each prefill rank
registers how to reach it (PUT /route: its Mooncake session, the socket that takes page indices, its KV layout)
and where a decode instance looks it up (GET /route) and checks it is alive (GET /health, the heartbeat)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec

from semipd_runtime.pd_types import RankInfo

log = logging.getLogger(__name__)
WILDCARDS = ("0.0.0.0", "::", "")


def advertised_host(host: str) -> str:
    """The address peers reach us at: `host` itself, or for a wildcard bind this machine's outward address (the
    interface a route to outside would use; no packet is sent), which a peer on another host can dial."""
    if host not in WILDCARDS:
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))
        return str(s.getsockname()[0])
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


class BootstrapServer:
    def __init__(self, host: str, port: int) -> None:
        self.ranks: dict[int, RankInfo] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                log.debug("bootstrap %s", format % args)

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/health":
                    return self._reply(200, b'{"status":"ok"}')
                if self.path.startswith("/route"):
                    with server.lock:
                        ranks = list(server.ranks.values())
                    if not ranks:
                        return self._reply(503, b'{"error":"no prefill rank registered yet"}')
                    return self._reply(200, msgspec.json.encode(ranks))
                self._reply(404, b'{"error":"not found"}')

            def do_PUT(self) -> None:
                if not self.path.startswith("/route"):
                    return self._reply(404, b'{"error":"not found"}')
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    info = msgspec.json.decode(body, type=RankInfo)
                except msgspec.DecodeError as e:
                    return self._reply(400, json.dumps({"error": str(e)}).encode())
                with server.lock:
                    server.ranks[info.rank] = info
                self._reply(200, b'{"status":"registered"}')

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pd-bootstrap", daemon=True)
        self.thread.start()
        log.info("PD bootstrap server on %s:%d", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def register(host: str, port: int, info: RankInfo, timeout_s: float = 5.0) -> None:
    req = urllib.request.Request(f"http://{host}:{port}/route", data=msgspec.json.encode(info), method="PUT",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        r.read()


def lookup(host: str, port: int, timeout_s: float) -> list[RankInfo]:
    """The ranks registered at a prefill's bootstrap server (raises OSError / ValueError when unreachable)."""
    with urllib.request.urlopen(f"http://{host}:{port}/route", timeout=timeout_s) as r:
        return msgspec.json.decode(r.read(), type=list[RankInfo])


def alive(host: str, port: int, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False
