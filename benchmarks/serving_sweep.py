"""Goodput sweep: start the semipd server once per configuration, run bench_serving's rate sweep against it, stop
it, and compare all configurations in one results file, table and set of plots.

    python benchmarks/serving_sweep.py --model-path DIR --server-args "--load-format dummy --context-length 8192" \
        --config unified="" --config semi-pd-static="--enable-semi-pd --sm-partition green --decode-sm-percent 40" \
        --config semi-pd-slo="--enable-semi-pd --sm-partition green --partition-policy slo" \
        --bench-args "--dataset longtail --num-prompts 200 --request-rates 2 4 8 --slo-ttft-ms 2000 --slo-tpot-ms 50" \
        --out $OUT/sweep.json --plot-dir $OUT

Everything after a config's `=` is passed to `semipd-server` on top of --server-args; --bench-args go to every
bench_serving run (`semipd-bench-serving`: `semipd_server.bench.serving`). Server logs land beside the results
file (<out stem>.<label>.log).

The static oracle: `--static-oracle 20 30 40 50 60` adds one static config per decode share (labels static-dNN,
flags `--oracle-flags` + `--decode-sm-percent NN`), and the end report judges every config against the best of
them at each `--oracle-slos TTFT_MS:TPOT_MS` (a policy is judged against the best static split, not the default).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from semipd_server.bench import serving as bench_serving
from semipd_server.testing import ServerProcess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model directory (default: the bundled default model)")
    ap.add_argument("--server-args", default="", help="flags for every server")
    ap.add_argument("--config", action="append", default=[], metavar="LABEL=FLAGS",
                    help="one server configuration (repeatable)")
    ap.add_argument("--static-oracle", type=float, nargs="+", default=[], metavar="DECODE_PERCENT",
                    help="also the static split at each of these decode shares (labels static-dNN)")
    ap.add_argument("--oracle-flags", default="--enable-semi-pd --sm-partition green",
                    help="server flags of the static-oracle configs (plus --decode-sm-percent NN)")
    ap.add_argument("--oracle-slos", nargs="+", default=[], metavar="TTFT_MS:TPOT_MS",
                    help="SLOs the oracle report judges at (default: the bench's)")
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
    for pct in args.static_oracle:
        if not 0 < pct < 100:
            ap.error(f"--static-oracle shares must be in (0, 100), got {pct:g}")
        configs.append((f"static-d{pct:g}", [*shlex.split(args.oracle_flags), "--decode-sm-percent", f"{pct:g}"]))
    if not configs:
        ap.error("give at least one --config or --static-oracle share")
    failures = 0
    for label, flags in configs:
        log = args.out.with_name(f"{args.out.stem}.{label}.log")
        server_flags = ([] if args.model_path is None else ["--model-path", args.model_path])
        server_flags += shlex.split(args.server_args) + flags
        print(f"=== {label}: semipd-server {' '.join(server_flags)}", flush=True)
        server = None
        try:
            server = ServerProcess(*server_flags, log_path=log, startup_timeout_s=args.startup_timeout_s,
                                   single_thread=False)
            rc = bench_serving.main(["--base-url", server.url, "--label", label, "--out", str(args.out),
                                     "--no-progress", *shlex.split(args.bench_args)])
            failures += rc != 0
        except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others
            print(f"{label} failed: {e}", flush=True)
            failures += 1
        finally:
            if server is not None:
                server.stop()
    if args.out.exists():
        oracle = ["--oracle", "static-d", *(["--oracle-slos", *args.oracle_slos] if args.oracle_slos else [])]
        bench_serving.main(["--compare", str(args.out), *(["--plot-dir", args.plot_dir] if args.plot_dir else []),
                            *(oracle if args.static_oracle else [])])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
