"""Decode-step cost of grammar masking (structured output) at batch 64, 8B shape, random weights: the step as
the engine core runs it in overlap mode, without grammars and with a JSON-schema grammar on every row.

    python benchmarks/bench_grammar_overhead.py --shape llama-3.1-8b --batch 64 --ctx 1024 --out $OUT/grammar.json
    python benchmarks/bench_grammar_overhead.py --device cpu --shape tiny --steps 5   # a CPU smoke run

One step (as `EngineCore.launch` / `CoreGrammars.bitmask` do it): the forward (a CUDA graph, its input ids the step
before's tokens, read on the device) is queued; with grammars the host then waits for the step before's tokens,
advances the 64 matchers with them and fills the 64 masks on llguidance's threads while the device runs the
forward, and queues the masks' copy; the sampling (masks applied just before it) is queued; without grammars the host
reads the step before's tokens after queueing everything (it overlaps the whole step). Times are wall clock per
step (median over --steps). The parts: mask fill and matcher advance (host, median per step) and the bitmask
kernel alone (device, CUDA events).

The matchers use a real tokenizer (--tokenizer-dir, default: the default model's, 49k tokens) with masks as wide
as the shape's vocabulary; random weights sample at random among the allowed tokens, and a matcher whose grammar
completes starts again. Prints JSON rows; --out writes them with the device name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers

from semipd_memory import KVPool
from semipd_runtime.grammar import (
    GrammarCompiler,
    GrammarRuntime,
    StructuredOutput,
    TokenBitmask,
)
from semipd_runtime.messages import CoreSampling
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, init_random_weights
from semipd_runtime.sampler import SampledTokens, Sampler

# a list of records: strings, numbers, booleans, enums and nesting keep the matchers in every kind of state
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"},
                           "ok": {"type": "boolean"}, "kind": {"enum": ["a", "b", "c"]}},
            "required": ["name", "qty", "price", "ok", "kind"]}},
        "note": {"type": "string"},
    },
    "required": ["items", "note"],
}


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3 if xs else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from semipd_runtime.models.default_model import default_model_path

        dev = torch.device(args.device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        tok_dir = args.tokenizer_dir or default_model_path()
        tok_vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
        cfg = dict(with_layers(SHAPES[args.shape], args.layers))
        cfg["vocab_size"] = max(cfg["vocab_size"], len(tok_vocab) + 64)  # masks cover at least the tokenizer
        mcfg = ModelConfig.from_dict(cfg)
        model = build_empty_model(mcfg, dev, dtype)
        init_random_weights(model, seed=0)
        page, b, ctx = 16, args.batch, args.ctx
        pages_per = -(-(ctx + 1) // page)
        pool = KVPool(mcfg.num_layers, b * pages_per, page, mcfg.num_kv_heads, mcfg.head_dim, dtype, dev)
        # CPU: the same padded static-buffer forward, eager (ModelRunner's graph_replay=False)
        self.runner = ModelRunner(model, pool, page, ctx + 16, cuda_graph_max_bs=b, graph_replay=dev.type == "cuda")
        self.table = torch.arange(b * pages_per, dtype=torch.int32, device=dev).view(b, pages_per)
        self.dev, self.b, self.ctx = dev, b, ctx
        self.sampler = Sampler()
        self.params = [CoreSampling(temperature=1.0, seed=i) for i in range(b)]
        grammar = GrammarCompiler(tok_dir, mcfg.vocab_size, 2).compile(StructuredOutput("json_schema",
                                                                                        json.dumps(SCHEMA)))
        self.grammars = GrammarRuntime(tok_dir, mcfg.vocab_size, 2)
        self.matchers = [self.grammars.matcher(grammar) for _ in range(b)]
        self.fill_s: list[float] = []
        self.advance_s: list[float] = []
        self.restarts = 0

    def _launch(self, prev: SampledTokens | None) -> torch.Tensor:
        chunks = [[-1 - j] for j in range(self.b)] if prev is not None else [[5]] * self.b
        return self.runner.forward(chunks, [self.ctx] * self.b, self.table, list(range(self.b)),
                                   prev.tokens if prev is not None else None)

    def _advance(self, tokens: list[int]) -> None:
        t0 = time.perf_counter()
        for g, tok in zip(self.matchers, tokens):
            if g.accept(tok) or g.terminated:
                g.matcher.reset()  # a completed (or, never expected, rejected) grammar starts again
                self.restarts += 1
        self.advance_s.append(time.perf_counter() - t0)

    def run(self, steps: int, grammar: bool) -> float:
        """Median wall time of a step over `steps` steps (after 3 of warm-up)."""
        prev: SampledTokens | None = None
        times = []
        rows = list(range(self.b))
        for step in range(steps + 3):
            t0 = time.perf_counter()
            logits = self._launch(prev)
            mask: TokenBitmask | None = None
            if grammar:
                if prev is not None:  # the early resolve: the masks need the step before's tokens
                    self._advance(prev.read()[0])
                t1 = time.perf_counter()
                mask = self.grammars.bitmask(rows, self.matchers, self.dev)
                self.fill_s.append(time.perf_counter() - t1)
            sampled = self.sampler.sample(logits, self.params, [step] * self.b, bitmask=mask)
            if not grammar and prev is not None:
                prev.read()  # the ordinary resolve of the step before, after this one is queued
            prev = sampled
            if step >= 3:
                times.append(time.perf_counter() - t0)
        assert prev is not None
        prev.read()
        return statistics.median(times)

    def apply_kernel_us(self, iters: int = 50) -> float:
        """The bitmask kernel alone over the batch (device time, CUDA only)."""
        if self.dev.type != "cuda":
            return 0.0
        logits = torch.randn(self.b, self.runner.model.config.vocab_size, device=self.dev)
        mask = self.grammars.bitmask(list(range(self.b)), self.matchers, self.dev)
        for _ in range(3):
            mask.apply(logits)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            mask.apply(logits)
        e.record()
        e.synchronize()
        return s.elapsed_time(e) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES), help="model shape (random weights)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--batch", type=int, default=64, help="decode batch (every row has a grammar in the second run)")
    ap.add_argument("--ctx", type=int, default=1024, help="tokens of KV per request")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved (median of each)")
    ap.add_argument("--tokenizer-dir", type=Path, default=None,
                    help="a model directory with tokenizer.json (default: the default model's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    bench = Bench(args)
    plain, masked = [], []
    for _ in range(args.repeats):  # interleaved: clock and thermal drift hit both alike
        plain.append(bench.run(args.steps, grammar=False))
        masked.append(bench.run(args.steps, grammar=True))
    p, m = statistics.median(plain), statistics.median(masked)
    row: dict[str, Any] = {
        "shape": args.shape, "batch": args.batch, "ctx": args.ctx, "steps": args.steps,
        "step_ms_plain": p * 1e3, "step_ms_grammar": m * 1e3, "overhead_pct": 100 * (m - p) / p,
        "mask_fill_ms": median_ms(bench.fill_s), "matcher_advance_ms": median_ms(bench.advance_s),
        "apply_kernel_us": bench.apply_kernel_us(), "grammar_restarts": bench.restarts,
        "runs_plain_ms": [x * 1e3 for x in plain], "runs_grammar_ms": [x * 1e3 for x in masked],
    }
    print(json.dumps(row), flush=True)
    if args.out:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": [row]}, indent=2))


if __name__ == "__main__":
    main()
