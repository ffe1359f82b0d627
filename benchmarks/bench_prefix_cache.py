"""Prefix-cache TTFT: a request whose long prefix is already in the radix cache vs the same request computed.

    python benchmarks/bench_prefix_cache.py --shape llama-3.1-8b --prefix-len 4096 --suffix-len 64 \
        --repeats 5 --out $OUT/prefix_cache.json
    python benchmarks/bench_prefix_cache.py --shape tiny --device cpu --prefix-len 256     # CPU smoke run

Each repeat draws a fresh random prefix P (--prefix-len tokens) and two suffixes a != b (--suffix-len tokens):
  miss   P+b on a core with the radix cache off: every prompt token is computed;
  prime  P+a on the caching core: also a miss (P is new there); it leaves P's full pages in the cache;
  hit    P+b on the caching core: P's pages are shared, only the suffix is computed.
miss and hit run the same prompt, so their greedy first tokens must agree (a correctness check of the cached
path); their top logprobs are compared too. Requests run one at a time with max_tokens=1, so TTFT is one
request's prefill: add_request -> its token back on the host (torch.cuda.synchronize before and after on CUDA,
wall time on CPU). Both cores share one random-weight model at the shape; the first --warmup repeats are not
timed (Triton compiles a kernel per shape: prefill from zero, and a short chunk after a long cached context).
Exit status 1 when a hit's greedy token differs from its miss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, init_random_weights

CASES = ("miss", "prime", "hit")
GREEDY = CoreSampling(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2)


@dataclass(slots=True)
class Sample:
    """One timed request: TTFT, its greedy token (+ logprob, top-2 margin) and what the cache served."""

    ttft_s: float
    token: int
    logprob: float
    margin: float  # top-1 minus top-2 logprob: how far from a tie the greedy choice was
    hit_tokens: int
    query_tokens: int


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_token(core: EngineCore, rid: str, prompt: list[int], device: str) -> Sample:
    """Run one request alone to its first token; the cache counters' change is what it was served."""
    assert not core.has_work(), "the core must be idle: TTFT of one request alone"
    before = core.stats()
    sync(device)
    t0 = time.perf_counter()
    core.add_request(AddRequest(rid, prompt, GREEDY))
    while True:
        events = [e for e in core.step() if e.rid == rid]
        if any(e.token_ids for e in events):
            break
        failed = [e for e in events if e.finish_reason is not None]
        if failed or not (core.has_work() or core.pending):
            raise RuntimeError(f"request {rid} ended without a token: {failed}")
    sync(device)
    dt = time.perf_counter() - t0
    (event,) = [e for e in events if e.token_ids]
    after = core.stats()
    assert event.logprobs, "greedy requests ask for logprobs"
    lp = event.logprobs[0]
    top = sorted((v for _, v in lp.top), reverse=True)
    margin = top[0] - top[1] if len(top) > 1 else float("inf")
    return Sample(dt, event.token_ids[0], lp.logprob, margin,
                  hit_tokens=after.prefix_hit_tokens - before.prefix_hit_tokens,
                  query_tokens=after.prefix_query_tokens - before.prefix_query_tokens)


def make_core(model: Any, args: argparse.Namespace, dtype: torch.dtype, radix_cache: bool) -> EngineCore:
    prompt_len = args.prefix_len + args.suffix_len
    pages_per_prompt = -(-(prompt_len + 1) // args.page_size)
    return EngineCore(EngineConfig.from_knobs(
        model_path="<random>", device=args.device, dtype=str(dtype).removeprefix("torch."),
        max_model_len=prompt_len + args.page_size, eos_token_ids=[], max_running_requests=2,
        chunked_prefill_size=args.chunked_prefill_size, page_size=args.page_size,
        # the caching core keeps a few prompts' pages cached (LRU-evicted beyond that)
        num_pages=(3 if radix_cache else 1) * pages_per_prompt + 8, enable_radix_cache=radix_cache,
        disable_cuda_graph=True), model=model)


def run_repeat(miss_core: EngineCore, hit_core: EngineCore, args: argparse.Namespace, vocab: int,
               gen: torch.Generator, tag: str) -> dict[str, Sample]:
    def rand(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    prefix, a, b = rand(args.prefix_len), rand(args.suffix_len), rand(args.suffix_len)
    if a[0] == b[0]:  # the suffixes must part at their first token, so the hit is exactly the prefix's pages
        b[0] = 10 + (b[0] - 10 + 1) % (vocab - 10)
    return {"miss": first_token(miss_core, f"{tag}-miss", prefix + b, args.device),
            "prime": first_token(hit_core, f"{tag}-prime", prefix + a, args.device),
            "hit": first_token(hit_core, f"{tag}-hit", prefix + b, args.device)}


def summarize(samples: list[dict[str, Sample]]) -> dict[str, Any]:
    cases = {}
    for case in CASES:
        ms = [1e3 * s[case].ttft_s for s in samples]
        cases[case] = {"ttft_ms": ms, "median_ms": statistics.median(ms), "min_ms": min(ms),
                       "hit_tokens": [s[case].hit_tokens for s in samples],
                       "query_tokens": [s[case].query_tokens for s in samples]}
    greedy = [{"miss_token": s["miss"].token, "hit_token": s["hit"].token, "miss_logprob": s["miss"].logprob,
               "hit_logprob": s["hit"].logprob, "miss_top2_margin": s["miss"].margin} for s in samples]
    return {"cases": cases,
            "speedup_median": cases["miss"]["median_ms"] / cases["hit"]["median_ms"],
            "speedup_min": cases["miss"]["min_ms"] / cases["hit"]["min_ms"],
            "greedy": greedy, "greedy_match": all(g["miss_token"] == g["hit_token"] for g in greedy),
            "max_logprob_diff": max(abs(g["miss_logprob"] - g["hit_logprob"]) for g in greedy)}


def print_table(info: dict[str, Any]) -> None:
    print(f"\nprefix {info['prefix_len']} + suffix {info['suffix_len']} tokens, {info['shape']} "
          f"({info['layers']} layers, {info['dtype']}) on {info['device']}, {info['repeats']} repeats")
    print(f"{'case':<7}{'TTFT median ms':>16}{'min ms':>10}   cache hit / prompt tokens")
    for case, c in info["cases"].items():
        hits = sorted(set(c["hit_tokens"]))
        hit_text = str(hits[0]) if len(hits) == 1 else f"{hits[0]}-{hits[-1]}"
        print(f"{case:<7}{c['median_ms']:>16.2f}{c['min_ms']:>10.2f}   {hit_text} / {c['query_tokens'][0]}")
    print(f"speed-up of hit over miss: {info['speedup_median']:.2f}x (medians), "
          f"{info['speedup_min']:.2f}x (mins)")
    matches = sum(g["miss_token"] == g["hit_token"] for g in info["greedy"])
    print(f"greedy first token, hit == miss: {matches}/{len(info['greedy'])} "
          f"(max |logprob diff| {info['max_logprob_diff']:.2e}, smallest miss top-2 margin "
          f"{min(g['miss_top2_margin'] for g in info['greedy']):.3g})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefix-len", type=int, default=4096,
                    help="shared prefix tokens (a multiple of --page-size is served whole)")
    ap.add_argument("--suffix-len", type=int, default=64, help="distinct suffix tokens per request")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (fresh prefix each)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repeats first (kernel compiles)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunked-prefill-size", type=int, default=8192,
                    help="token budget per step (the server's default is 512; 8192: a 4k prompt in one step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    args = ap.parse_args()
    for name in ("prefix_len", "suffix_len", "repeats", "page_size", "chunked_prefill_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    cfg = with_layers(SHAPES[args.shape], args.layers)
    model = build_empty_model(ModelConfig.from_dict(cfg), torch.device(args.device), dtype)
    init_random_weights(model, seed=args.seed)
    miss_core, hit_core = make_core(model, args, dtype, False), make_core(model, args, dtype, True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        run_repeat(miss_core, hit_core, args, cfg["vocab_size"], gen, f"warm{i}")
    print(f"warm-up: {args.warmup} repeats in {time.perf_counter() - t0:.1f} s", flush=True)
    samples = [run_repeat(miss_core, hit_core, args, cfg["vocab_size"], gen, f"r{i}")
               for i in range(args.repeats)]
    stats = hit_core.stats()
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "shape": args.shape, "layers": cfg["num_hidden_layers"],
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
            "page_size": args.page_size, "chunked_prefill_size": args.chunked_prefill_size,
            "repeats": args.repeats, "warmup": args.warmup,
            "expected_hit_tokens": args.prefix_len // args.page_size * args.page_size,
            **summarize(samples),
            # totals of the caching core since start (warm-up included), as EngineStats reports them
            "engine_stats": {"prefix_hit_tokens": stats.prefix_hit_tokens,
                             "prefix_query_tokens": stats.prefix_query_tokens,
                             "cached_pages": stats.cached_pages}}
    print_table(info)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2))
        print(f"results: {args.out}")
    if not info["greedy_match"]:
        print("error: a hit's greedy first token differs from the miss of the same prompt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
