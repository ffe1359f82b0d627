"""Offline throughput: our engine vs transformers `generate` on the same random-weight model.

    python benchmarks/bench_offline.py --shape llama-3.1-8b --batches 1 16 64 --prompt-len 512 --output-len 128 \
        --out $OUT/bench_offline.json

Both run greedy with EOS ignored (fixed output lengths); ours runs through EngineCore (paged KV, continuous
batching) with the kernels the backend switch picks on this device, with decode CUDA graphs (ours_*) and
without (ours_eager_*)."""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, load_weights


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_hf(cfg_dict: dict, device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def run_ours(core: EngineCore, prompts: list[list[int]], out_len: int) -> tuple[float, dict]:
    """Seconds for the whole batch, and a split of the wall time into decode-only steps and the rest."""
    for i, p in enumerate(prompts):
        core.add_request(AddRequest(f"b{time.monotonic_ns()}-{i}", p,
                                    CoreSampling(temperature=0.0, max_tokens=out_len, ignore_eos=True)))
    sync()
    decode_times: list[float] = []
    other_s, other_steps, n_tokens = 0.0, 0, 0
    t0 = time.perf_counter()
    while core.has_work() or core.pending:
        running = [r for r in core.scheduler.running if r.num_uncomputed == 1]
        decode_only = not core.scheduler.waiting and len(running) == len(core.scheduler.running)
        ts = time.perf_counter()
        events = core.step()
        dt = time.perf_counter() - ts  # each step ends by reading its sampled tokens back: a sync
        n_tokens += sum(len(e.token_ids) for e in events)
        if decode_only:
            decode_times.append(dt)
        else:
            other_s, other_steps = other_s + dt, other_steps + 1
    sync()
    total = time.perf_counter() - t0
    assert n_tokens == len(prompts) * out_len, n_tokens
    decode_times.sort()
    split = {"decode_steps": len(decode_times), "decode_s": sum(decode_times),
             "decode_step_p50_ms": 1e3 * decode_times[len(decode_times) // 2] if decode_times else None,
             "other_steps": other_steps, "other_s": other_s}
    return total, split


def run_hf(model, prompts: list[list[int]], out_len: int) -> float:  # type: ignore[no-untyped-def]
    ids = torch.tensor(prompts, device=model.device)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                             min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    sync()
    assert out.shape[1] == ids.shape[1] + out_len
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="print a CPU profile of the CUDA-graph engine's runs")
    ap.add_argument("--skip-eager", action="store_true", help="only the CUDA-graph engine (default: both)")
    ap.add_argument("--no-overlap-run", action="store_true",
                    help="skip the CUDA-graph engine with overlap scheduling off (default: it runs beside the others)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cfg_dict = with_layers(SHAPES[args.shape], args.layers)
    torch.manual_seed(0)
    hf = build_hf(cfg_dict, args.device, dtype)
    ours = build_empty_model(ModelConfig.from_dict(cfg_dict), torch.device(args.device), dtype)
    load_weights(ours, hf.state_dict().items(), source="transformers model")
    max_b = max(args.batches)
    tokens = max_b * (args.prompt_len + args.output_len)

    def make_core(graphs: bool, overlap: bool = True) -> EngineCore:
        core = EngineCore(EngineConfig.from_knobs(
            model_path="<random>", device=args.device, dtype=str(dtype).removeprefix("torch."),
            max_model_len=args.prompt_len + args.output_len + 16, eos_token_ids=[], max_running_requests=max_b,
            chunked_prefill_size=8192, page_size=16, num_pages=tokens // 16 + 2 * max_b,
            disable_cuda_graph=not graphs, disable_overlap_schedule=not overlap), model=ours)
        core.capture_cuda_graphs()
        return core

    cores = {"graphs": make_core(True)}
    if not args.no_overlap_run:
        cores["serial"] = make_core(True, overlap=False)  # same engine, step N+1 scheduled after N's tokens
    if not args.skip_eager and args.device == "cuda":
        cores["eager"] = make_core(False)
    if args.skip_hf:
        del hf
        hf = None
    g = torch.Generator().manual_seed(1)
    results = []
    for b in args.batches:
        prompts = torch.randint(10, cfg_dict["vocab_size"], (b, args.prompt_len), generator=g).tolist()
        row: dict = {"batch": b}
        for name, core in cores.items():
            # warm-up at the same shapes (Triton specializes on them; compiling must not be timed), other
            # tokens (so a prefix cache cannot serve the timed run)
            run_ours(core, torch.randint(10, cfg_dict["vocab_size"], (b, args.prompt_len), generator=g).tolist(), 4)
            prof = cProfile.Profile() if args.cprofile and name == "graphs" else None
            if prof:
                prof.enable()
            t, split = run_ours(core, prompts, args.output_len)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            key = {"graphs": "ours", "serial": "ours_no_overlap", "eager": "ours_eager"}[name]
            row |= {f"{key}_s": t, f"{key}_tok_s": b * args.output_len / t}
            row |= {f"{key}_{k}": v for k, v in split.items()}
        t_ours = row["ours_s"]
        if hf is not None:
            run_hf(hf, prompts[:1], 4)
            t_hf = run_hf(hf, prompts, args.output_len)
            row |= {"hf_s": t_hf, "hf_tok_s": b * args.output_len / t_hf, "speedup": t_hf / t_ours}
        results.append(row)
        print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": args.shape,
            "layers": cfg_dict["num_hidden_layers"], "prompt_len": args.prompt_len,
            "output_len": args.output_len, "dtype": str(dtype), "torch": torch.__version__, "results": results}
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
