"""Decode-step cost of penalties, logit_bias and min_tokens (issue 24's goal: < 5% at batch 64).

    python benchmarks/bench_sampling_overhead.py --shape llama-3.1-8b --batches 64 --contexts 1024 \
        --out $OUT/sampling_overhead.json

One step = what the engine core does per decode step without overlap: the forward (CUDA graph on CUDA) over B
requests of one new token each with `ctx` tokens of KV, then `Sampler.sample` with the step's `PenaltyPlan`
(built on the host by `PenaltyRows`, as the core does), then the read of the tokens. Cases, every request alike:
  none       temperature 0.7 / top-p 0.9, no plan (the path a batch without penalties takes);
  penalties  + presence 0.5, frequency 0.5, repetition 1.1 (device-side counts, kept up to date each step);
  all        + 16 logit_bias entries and min_tokens (EOS banned) on top.
Reported: median step time (wall clock, host work included), the sampling part alone (CUDA events), and the
overhead of each case over `none`; `rebuild_ms` is the one-off step where every row is rebuilt from its prompt
(a request's first decode step after admission). Random weights at the real shape: no download needed.
`--shape tiny --device cpu` is a smoke run of the same code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers

from semipd_memory import KVPool
from semipd_runtime.messages import CoreSampling
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, init_random_weights
from semipd_runtime.penalties import PenaltyRows
from semipd_runtime.request import Request
from semipd_runtime.sampler import Sampler

PLAIN = CoreSampling(temperature=0.7, top_p=0.9, seed=1, max_tokens=1 << 20)


def case_sampling(case: str, vocab: int, eos: int) -> CoreSampling:
    if case == "none":
        return PLAIN
    pen = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)
    if case == "penalties":
        return CoreSampling(**{**_fields(PLAIN), **pen})
    bias = {(97 * i) % vocab: (-1.0) ** i * 5.0 for i in range(16) if (97 * i) % vocab != eos}
    return CoreSampling(**{**_fields(PLAIN), **pen, "logit_bias": bias, "min_tokens": 1 << 19})


def _fields(s: CoreSampling) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


def timed(fn: Callable[[], None], iters: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of each call (each ends with a host read, so it includes the device's work)."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class Step:
    """B decode requests at context ctx, as the core holds them: slot i, a random prompt, outputs growing."""

    def __init__(self, runner: ModelRunner, eos: int, b: int, ctx: int, page: int, sampling: CoreSampling,
                 gen: torch.Generator) -> None:
        vocab = runner.model.config.vocab_size
        self.runner, self.eos = runner, eos
        self.reqs = [Request(f"r{i}", torch.randint(10, vocab, (ctx,), generator=gen).tolist(), sampling, slot=i)
                     for i in range(b)]
        pages_per = -(-(ctx + 1) // page)
        self.table = torch.arange(b * pages_per, dtype=torch.int32, device=runner.device).view(b, pages_per)
        self.chunks = [[t] for t in torch.randint(10, vocab, (b,), generator=gen).tolist()]
        self.starts = [ctx] * b
        self.rows = PenaltyRows({eos})
        self.sampler = Sampler()
        self.sample_ms: list[float] = []

    def __call__(self) -> None:
        logits = self.runner.forward(self.chunks, self.starts, self.table, list(range(len(self.reqs))))
        dev = logits.device
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if dev.type == "cuda" else None
        t0 = time.perf_counter()
        if ev is not None:
            ev[0].record()
        plan = self.rows.plan(self.reqs)
        sampled = self.sampler.sample(logits, [r.sampling for r in self.reqs],
                                      [len(r.output_ids) for r in self.reqs], plan)
        if ev is not None:
            ev[1].record()
        tokens, _ = sampled.read()
        self.sample_ms.append(ev[0].elapsed_time(ev[1]) if ev is not None else (time.perf_counter() - t0) * 1e3)
        for req, tok in zip(self.reqs, tokens):
            req.output_ids.append(tok)  # the core's bookkeeping: one more counted output per step


def run_case(runner: ModelRunner, eos: int, b: int, ctx: int, page: int, case: str, iters: int,
             seed: int) -> dict[str, Any]:
    vocab = runner.model.config.vocab_size
    step = Step(runner, eos, b, ctx, page, case_sampling(case, vocab, eos), torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    step()  # the first step rebuilds every row from its prompt (ctx tokens each)
    rebuild_ms = (time.perf_counter() - t0) * 1e3
    step.sample_ms.clear()
    times = timed(step, iters, runner.device)
    return {"case": case, "batch": b, "ctx": ctx, "step_ms": statistics.median(times) * 1e3,
            "step_ms_all": [t * 1e3 for t in times], "sample_ms": statistics.median(step.sample_ms[3:]),
            "rebuild_step_ms": rebuild_ms}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024])
    ap.add_argument("--cases", nargs="+", default=["none", "penalties", "all"],
                    choices=["none", "penalties", "all"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="cases interleaved this many times (medians kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mcfg = ModelConfig.from_dict(with_layers(SHAPES[args.shape], args.layers))
    model = build_empty_model(mcfg, device, dtype)
    init_random_weights(model, seed=0)
    page, max_ctx = 16, max(args.contexts) + 16
    num_pages = max(args.batches) * -(-max_ctx // page)
    pool = KVPool(mcfg.num_layers, num_pages, page, mcfg.num_kv_heads, mcfg.head_dim, dtype, device)
    runner = ModelRunner(model, pool, page, max_ctx, cuda_graph_max_bs=max(args.batches) if device.type == "cuda"
                         else 0)
    eos = int(SHAPES[args.shape].get("eos_token_id", 2))
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for ctx in args.contexts:
            for b in args.batches:
                got: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases}
                for r in range(args.rounds):  # interleaved: drift (clocks, other work) hits every case alike
                    for case in args.cases:
                        got[case].append(run_case(runner, eos, b, ctx, page, case, args.iters, seed=r))
                base = statistics.median(x["step_ms"] for x in got[args.cases[0]])
                for case, runs in got.items():
                    row = {"case": case, "batch": b, "ctx": ctx,
                           "step_ms": statistics.median(x["step_ms"] for x in runs),
                           "sample_ms": statistics.median(x["sample_ms"] for x in runs),
                           "rebuild_step_ms": statistics.median(x["rebuild_step_ms"] for x in runs),
                           "rounds": runs}
                    row["overhead_pct"] = 100 * (row["step_ms"] / base - 1)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    print(f"{'case':>10} {'B':>4} {'ctx':>5} {'step ms':>8} {'sample ms':>9} {'overhead':>8} {'rebuild ms':>10}")
    for r in rows:
        print(f"{r['case']:>10} {r['batch']:>4} {r['ctx']:>5} {r['step_ms']:>8.3f} {r['sample_ms']:>9.3f} "
              f"{r['overhead_pct']:>7.1f}% {r['rebuild_step_ms']:>10.2f}")
    if args.out:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": name, "shape": args.shape, "layers": mcfg.num_layers,
                                        "vocab": mcfg.vocab_size, "torch": torch.__version__,
                                        "cases_vs": args.cases[0], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
