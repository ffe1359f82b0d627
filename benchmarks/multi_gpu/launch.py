"""Start a named multi-GPU topology of `semipd-server` instances (plus the smg gateway in front where there are
several), bench it with `semipd-bench-serving` or check its greedy outputs, and tear it all down (issue 20).

Topologies (GPUs from --gpus, default 0 1; a server gets its first GPU with --base-gpu-id):
  single  one server on the first GPU                      (a) unified, (b) semi-PD
  dp      one server per GPU, `smg launch --worker-urls`   (c) unified, (e) semi-PD
  pd      prefill instance on GPU 0, decode on GPU 1, `smg launch --pd-disaggregation`   (d)
  tp      one server with --tp-size len(--gpus)            (f) semi-PD

    python benchmarks/multi_gpu/launch.py bench --topology dp --label c-dp-unified-2gpu \\
        --server-args "--model-path scratch/llama8b --load-format dummy" --extra-args "--chunked-prefill-size 2048" \\
        --bench-args "--dataset uniform --input-len 3072 ..." --out $OUT/multi_gpu.json
    python benchmarks/multi_gpu/launch.py pd-greedy --server-args "..." --out $OUT/pd_greedy.json
    python benchmarks/multi_gpu/launch.py summary $OUT/multi_gpu.json

`bench` appends one labelled run to --out (bench_serving's results file) and, for `pd`, the KV transfer rate
scraped from the prefill instance's /metrics over the run to <out stem>.kv.json. `pd-greedy` runs a few prompts
greedily through one unified instance, then through the PD pair behind smg, and compares the outputs. `summary`
prints each label's request rate at 90% SLO attainment, total and per GPU (the GPU count is the label's
`-<N>gpu` suffix), with the KV rate where there is one.

Without GPUs every topology refuses to start (a clear error, exit 1) unless --cpu is given: then the servers run
on the CPU (--base-gpu-id dropped; TP over gloo), which rehearses launch, routing, bench and teardown. The
multicast switches the device requires (NCCL_NVLS_ENABLE=0, ...) are set here and so reach every child.
Process ids of everything started are written to --pid-file (default /tmp/semipd_multi_gpu.pids) so that a
shell wrapper can end leftovers by id if this process is killed hard.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from semipd_server.bench import serving as bench_serving
from semipd_server.bench.serving_data import rate_at_attainment
from semipd_server.testing import ServerProcess, free_port, scrape_metrics

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TOPOLOGIES = ("single", "dp", "pd", "tp")
SMG_CANDIDATES = ("/tmp/smg/bin/smg",)  # where multi_gpu.sh unpacks scratch/smg-min.tar.xz


def visible_gpus() -> int:
    """GPUs nvidia-smi lists (no torch import: the servers are the ones that use them)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(line.startswith("GPU ") for line in out.splitlines())
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        n = min(n, len([x for x in cvd.split(",") if x.strip()]))
    return n


def gpus_needed(topology: str, gpus: list[int]) -> list[int]:
    return gpus[:1] if topology == "single" else gpus[:2] if topology == "pd" else gpus


def find_smg(given: str | None) -> list[str]:
    """The gateway's command line: a Python launcher (the trimmed copy's bin/smg, or a venv's console script)
    runs under $SMG_PYTHON, default this interpreter."""
    cands = [given] if given else [os.environ.get("SMG", ""), *SMG_CANDIDATES, shutil.which("smg") or "",
                                   str(Path(sys.executable).parent / "smg")]
    for c in cands:
        if c and Path(c).is_file():
            head = Path(c).read_bytes()[:200]
            script = head.startswith(b"#!") and b"python" in head
            return [os.environ.get("SMG_PYTHON", sys.executable), c] if script else [c]
    raise SystemExit("error: no smg gateway found (bash benchmarks/multi_gpu/pack_smg.sh here, carry "
                     "scratch/smg-min.tar.xz, unpack to /tmp/smg; or --smg PATH)")


@dataclass
class Topology:
    """What is running: the servers, the gateway in front (if any) and the URL clients use."""

    name: str
    servers: list[ServerProcess] = field(default_factory=list)
    smg: subprocess.Popen[bytes] | None = None
    smg_log: Any = None
    url: str = ""
    prefill: ServerProcess | None = None

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers] + ([self.smg.pid] if self.smg is not None else [])

    def stop(self) -> None:
        if self.smg is not None:
            if self.smg.poll() is None:
                self.smg.terminate()
                try:
                    self.smg.wait(15)
                except subprocess.TimeoutExpired:
                    self.smg.kill()
                    self.smg.wait(10)
            self.smg_log.close()
            self.smg = None
        for s in reversed(self.servers):
            s.stop()
        self.servers.clear()


def _record_pids(args: argparse.Namespace, topo: Topology) -> None:
    if args.pid_file:
        Path(args.pid_file).write_text(" ".join(map(str, topo.pids())) + "\n")


def _model_id(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"])


def _wait_routes(topo: Topology, model: str, deadline_s: float) -> None:
    """Until one tiny request comes back 200 through the gateway (its workers are found healthy)."""
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        assert topo.smg is not None
        if topo.smg.poll() is not None:
            raise RuntimeError(f"smg exited with {topo.smg.returncode}; log {topo.smg_log.name}")
        try:
            r = httpx.post(f"{topo.url}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "hi", "max_tokens": 1, "temperature": 0})
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"smg did not route a request within {deadline_s:g} s (last: {last})")


def start(args: argparse.Namespace, topology: str, extra: list[str], log_dir: Path, tag: str) -> Topology:
    """Start `topology`; on any failure stop what was started and re-raise."""
    gpus = gpus_needed(topology, args.gpus)
    if topology in ("dp", "pd", "tp") and len(gpus) < 2:
        raise SystemExit(f"error: topology {topology} needs two --gpus, got {args.gpus}")
    if not args.cpu:
        have = visible_gpus()
        if have < max(gpus) + 1:
            raise SystemExit(f"error: topology {topology} needs GPUs {gpus} but {have} visible "
                             f"(--cpu rehearses it on the CPU)")
    base = shlex.split(args.server_args) + extra
    env = dict(MULTICAST_OFF)
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""

    def on(gpu: int) -> list[str]:
        return [] if args.cpu else ["--base-gpu-id", str(gpu)]

    def server(name: str, *flags: str) -> ServerProcess:
        print(f"  {tag}/{name}: semipd-server {' '.join(flags)}", flush=True)
        return ServerProcess(*flags, log_path=log_dir / f"{tag}.{name}.log", single_thread=args.cpu,
                             startup_timeout_s=args.startup_timeout_s, env=env)

    topo = Topology(topology)
    try:
        smg_cmd: list[str] = []
        if topology == "single":
            topo.servers.append(server("server", *base, *on(gpus[0])))
        elif topology == "tp":
            topo.servers.append(server("server", *base, "--tp-size", str(len(gpus)), *on(gpus[0])))
        elif topology == "dp":
            topo.servers += start_many(args, [(f"dp{i}", [*base, *on(g)]) for i, g in enumerate(gpus)], server)
            smg_cmd = ["--worker-urls", *(s.url for s in topo.servers)]
        else:  # pd: prefill instance on the first GPU, decode instance on the second
            boot = free_port()
            pd = ["--disaggregation-bootstrap-port", str(boot)]
            topo.servers += start_many(args, [
                ("prefill", [*base, *shlex.split(args.prefill_args), "--disaggregation-mode", "prefill", *pd,
                             *on(gpus[0])]),
                ("decode", [*base, *shlex.split(args.decode_args), "--disaggregation-mode", "decode", *pd,
                            *on(gpus[1])])], server)
            topo.prefill = topo.servers[0]
            smg_cmd = ["--pd-disaggregation", "--prefill", topo.prefill.url, str(boot), "--decode",
                       topo.servers[1].url]
        _record_pids(args, topo)
        model = _model_id(topo.servers[0].url)
        if not smg_cmd:
            topo.url = topo.servers[0].url
            return topo
        port = free_port()
        cmd = [*find_smg(args.smg), "launch", *smg_cmd, "--host", "127.0.0.1", "--port", str(port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
               "--health-check-interval-secs", "5", *shlex.split(args.smg_args)]
        print(f"  {tag}/smg: {' '.join(cmd)}", flush=True)
        topo.smg_log = open(log_dir / f"{tag}.smg.log", "wb")  # noqa: SIM115 - closed in Topology.stop()
        topo.smg = subprocess.Popen(cmd, stdout=topo.smg_log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **MULTICAST_OFF})
        topo.url = f"http://127.0.0.1:{port}"
        _record_pids(args, topo)
        _wait_routes(topo, model, args.smg_timeout_s)
        return topo
    except BaseException:
        topo.stop()
        raise


def start_many(args: argparse.Namespace, specs: list[tuple[str, list[str]]],
               server: Callable[..., ServerProcess]) -> list[ServerProcess]:
    """Servers on distinct GPUs start at once (each sizes its KV cache on its own GPU); on the CPU, or with
    --serial-start, one after another. If one fails, the others are stopped and the error re-raised."""
    if args.cpu or args.serial_start:
        done: list[ServerProcess] = []
        try:
            for name, flags in specs:
                done.append(server(name, *flags))
        except BaseException:
            for s in done:
                s.stop()
            raise
        return done
    with ThreadPoolExecutor(len(specs)) as pool:
        futs = [pool.submit(server, name, *flags) for name, flags in specs]
        wait(futs)
    started = [f.result() for f in futs if f.exception() is None]
    errors = [f.exception() for f in futs if f.exception() is not None]
    if errors:
        for s in started:
            s.stop()
        raise errors[0]  # type: ignore[misc]
    return started


def _kv(url: str) -> tuple[float, float, float]:
    m = scrape_metrics(url)
    return (m.get("semipd:pd_kv_transfer_bytes_total{}", 0.0), m.get("semipd:pd_kv_transfer_seconds_sum{}", 0.0),
            m.get("semipd:pd_kv_transfer_seconds_count{}", 0.0))


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"=== {args.label}: topology {args.topology}, gpus {gpus_needed(args.topology, args.gpus)}", flush=True)
    tag = out.stem if args.label in out.stem else f"{out.stem}.{args.label}"  # log names: <tag>.<server>.log
    topo = start(args, args.topology, shlex.split(args.extra_args), out.parent, tag)
    try:
        print(f"  up in {time.monotonic() - t0:.0f} s at {topo.url}", flush=True)
        kv0 = _kv(topo.prefill.url) if topo.prefill is not None else None
        rc = bench_serving.main(["--base-url", topo.url, "--label", args.label, "--out", str(out), "--no-progress",
                                 *shlex.split(args.bench_args)])
        if topo.prefill is not None and kv0 is not None:
            b1, s1, c1 = _kv(topo.prefill.url)
            b, s, c = b1 - kv0[0], s1 - kv0[1], c1 - kv0[2]
            row = {"label": args.label, "transfers": c, "bytes": b, "seconds": s,
                   "kv_gb_s": b / s / 1e9 if s > 0 else None, "kv_mb_per_request": b / c / 1e6 if c else None}
            kv_path = out.with_name(f"{out.stem}.kv.json")
            rows = json.loads(kv_path.read_text()) if kv_path.exists() else []
            kv_path.write_text(json.dumps([r for r in rows if r["label"] != args.label] + [row], indent=1))
            print(f"  KV transfer ({args.label}): {json.dumps(row)}", flush=True)
    finally:
        topo.stop()
        print(f"=== {args.label} done in {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def _greedy(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    outs = []
    for p in prompts:  # one at a time: the same batch shapes in both topologies
        r = httpx.post(f"{url}/v1/completions", timeout=150, json={
            "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
        outs.append(r.json()["choices"][0]["text"])
    return outs


def cmd_pd_greedy(args: argparse.Namespace) -> int:
    import random

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    # text, not token ids: smg's PD mode answers 400 to a token-id prompt; ~1 token per word
    words = ["alpha", "river", "stone", "cloud", "seven", "market", "yellow", "engine", "garden", "quiet", "north",
             "paper", "silver", "winter", "bridge", "candle", "forest", "orange", "planet", "thunder"]
    prompts = [" ".join(rng.choice(words) for _ in range(n)) for n in args.prompt_lens]
    results: dict[str, list[str]] = {}
    for topology in ("single", "pd"):
        topo = start(args, topology, shlex.split(args.extra_args), out.parent, f"{out.stem}.{topology}")
        try:
            results[topology] = _greedy(topo.url, _model_id(topo.servers[0].url), prompts, args.max_tokens)
        finally:
            topo.stop()
    equal = [a == b for a, b in zip(results["single"], results["pd"])]
    row = {"check": "pd-greedy", "prompt_lens": args.prompt_lens, "max_tokens": args.max_tokens,
           "equal_requests": sum(equal), "of": len(equal), "ok": all(equal),
           "first_mismatch": next(({"prompt_words": len(p.split()), "unified": a, "pd": b}
                                   for p, a, b in zip(prompts, results["single"], results["pd"]) if a != b), None)}
    print(json.dumps(row), flush=True)
    out.write_text(json.dumps({**row, "server_args": args.server_args, "extra_args": args.extra_args}, indent=1))
    print("ALL OK" if row["ok"] else "FAILED: pd-greedy", flush=True)
    return 0 if row["ok"] else 1


def cmd_summary(args: argparse.Namespace) -> int:
    """Rate at 90% attainment per label, total and per GPU; KV GB/s beside (d)."""
    kv: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for f in args.files:
        runs += bench_serving.load_runs(Path(f))
        kv_path = Path(f).with_name(f"{Path(f).stem}.kv.json")
        if kv_path.exists():
            kv |= {r["label"]: r for r in json.loads(kv_path.read_text())}
    lines = [f"{'label':<28}{'GPUs':>5}{'rate@90%':>12}{'per GPU':>10}  kind / KV transfer"]
    for run in runs:
        m = re.search(r"-(\d+)gpu$", run["label"])
        n = int(m.group(1)) if m else 1
        pts = run["rates"]
        rate, kind = rate_at_attainment([float(p["request_rate"]) for p in pts],
                                        [p["summary"]["slo_attainment"] for p in pts], args.target)
        r_txt = "-" if rate is None else f"{rate:.2f}"
        g_txt = "-" if rate is None else f"{rate / n:.2f}"
        note = kind
        if run["label"] in kv and kv[run["label"]]["kv_gb_s"] is not None:
            k = kv[run["label"]]
            note += f"; KV {k['kv_gb_s']:.2f} GB/s, {k['kv_mb_per_request']:.1f} MB/request"
        lines.append(f"{run['label']:<28}{n:>5}{r_txt:>12}{g_txt:>10}  {note}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def topo_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server-args", default="", help="flags for every server (model, load format, ...)")
        p.add_argument("--extra-args", default="", help="more flags for every server (the config's own)")
        p.add_argument("--prefill-args", default="", help="pd: flags for the prefill instance only")
        p.add_argument("--decode-args", default="", help="pd: flags for the decode instance only")
        p.add_argument("--gpus", type=int, nargs="+", default=[0, 1])
        p.add_argument("--cpu", action="store_true", help="run on the CPU (rehearsal; no GPU check)")
        p.add_argument("--smg", default=None, help="smg launcher (default: $SMG, /tmp/smg/bin/smg, PATH)")
        p.add_argument("--smg-args", default="--policy round_robin", help="more `smg launch` flags")
        p.add_argument("--startup-timeout-s", type=float, default=300.0)
        p.add_argument("--serial-start", action="store_true", help="start a topology's servers one at a time")
        p.add_argument("--smg-timeout-s", type=float, default=120.0)
        p.add_argument("--pid-file", default="/tmp/semipd_multi_gpu.pids")
        p.add_argument("--out", required=True)

    b = sub.add_parser("bench", help="start a topology, bench it, stop it")
    topo_args(b)
    b.add_argument("--topology", required=True, choices=TOPOLOGIES)
    b.add_argument("--label", required=True, help="run label (end it in -<N>gpu for the per-GPU summary)")
    b.add_argument("--bench-args", default="", help="flags for semipd-bench-serving")
    g = sub.add_parser("pd-greedy", help="greedy outputs: one unified instance vs the PD pair behind smg")
    topo_args(g)
    g.add_argument("--prompt-lens", type=int, nargs="+", default=[7, 100, 513, 1500, 3000], help="words")
    g.add_argument("--max-tokens", type=int, default=32)
    s = sub.add_parser("summary", help="rate at 90%% attainment per label, total and per GPU")
    s.add_argument("files", nargs="+")
    s.add_argument("--target", type=float, default=0.9)
    s.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.update(MULTICAST_OFF)

    def on_term(signum: int, frame: object) -> None:  # `timeout` sends SIGTERM: tear down through finally
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    if args.cmd == "bench":
        return cmd_bench(args)
    if args.cmd == "pd-greedy":
        return cmd_pd_greedy(args)
    return cmd_summary(args)


if __name__ == "__main__":
    sys.exit(main())
