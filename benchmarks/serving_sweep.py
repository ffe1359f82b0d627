"""Goodput sweep: start the semipd server once per configuration, run bench_serving's rate sweep against it, stop
it, and compare all configurations in one results file, table and set of plots.

    python benchmarks/serving_sweep.py --model-path DIR --server-args "--load-format dummy --context-length 8192" \
        --config unified="" --config semi-pd-static="--enable-semi-pd --sm-partition green --decode-sm-percent 40" \
        --config semi-pd-slo="--enable-semi-pd --sm-partition green --partition-policy slo" \
        --bench-args "--dataset longtail --num-prompts 200 --request-rates 2 4 8 --slo-ttft-ms 2000 --slo-tpot-ms 50" \
        --out $OUT/sweep.json --plot-dir $OUT

Everything after a config's `=` is passed to `semipd-server` on top of --server-args; --bench-args go to every
bench_serving run. Server logs land beside the results file (<out stem>.<label>.log).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server not healthy after {timeout_s}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model directory (default: the bundled default model)")
    ap.add_argument("--server-args", default="", help="flags for every server")
    ap.add_argument("--config", action="append", required=True, metavar="LABEL=FLAGS",
                    help="one server configuration (repeatable)")
    ap.add_argument("--bench-args", default="", help="flags for every bench_serving run")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot-dir", default=None)
    args = ap.parse_args()
    configs = []
    for c in args.config:
        label, sep, flags = c.partition("=")
        if not sep or not label:
            ap.error(f"--config must be LABEL=FLAGS, got {c!r}")
        configs.append((label, shlex.split(flags)))
    failures = 0
    for label, flags in configs:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = args.out.with_name(f"{args.out.stem}.{label}.log")
        cmd = [sys.executable, "-m", "semipd_server.cli", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--model-path", args.model_path] if args.model_path else []
        cmd += shlex.split(args.server_args) + flags
        print(f"=== {label}: {' '.join(cmd)}", flush=True)
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_healthy(url, proc, args.startup_timeout_s, log)
            rc = bench_serving.main(["--base-url", url, "--label", label, "--out", str(args.out), "--no-progress",
                                     *shlex.split(args.bench_args)])
            failures += rc != 0
        except Exception as e:  # one configuration failing must not lose the others
            print(f"{label} failed: {e}", flush=True)
            failures += 1
        finally:
            stop(proc)
    if args.out.exists():
        bench_serving.main(["--compare", str(args.out), *(["--plot-dir", args.plot_dir] if args.plot_dir else [])])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
