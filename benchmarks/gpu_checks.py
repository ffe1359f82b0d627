"""Correctness on the GPU, at real shapes in bf16 (run through the device tool; prints JSON lines).

    python benchmarks/gpu_checks.py --layers 4 --out $OUT/gpu_checks.json

Ground truth is transformers in float32 on the same random Llama-3.1-8B-shaped weights; both bf16 paths (ours and
transformers' own bf16) are measured against it, so bf16 rounding is not mistaken for a bug (random weights give
near-tied logits, where bf16 flips greedy tokens in either implementation).

1. parity: ours fp32 vs transformers fp32 (must agree: logits and greedy tokens), ours bf16 and transformers bf16
   vs transformers fp32 (ours must be no worse than transformers' own bf16), through the CUDA kernels.
2. cuda graphs: decode through captured graphs gives the tokens of the eager decode (fp32: all equal).
3. semi-PD: greedy outputs of semi-PD (none / green / mps) equal unified mode (fp32: all equal; bf16: agreement).
4. tensor parallel (`--tp 2`, only this check; needs 2 GPUs): greedy outputs of TP=2 (unified, and semi-PD on each
   of --partitions that runs prefill as a thread: none, green) equal TP=1 unified on the same weights (saved as
   safetensors: TP ranks load their own shards). fp32: all equal; bf16: agreement, as in 3 (the all-reduce sums
   in another order). Multicast stays off (NCCL_NVLS_ENABLE=0 ...: set here and in the rank processes).

    python benchmarks/gpu_checks.py --layers 4 --tp 2 --partitions none green --out $OUT/gpu_checks_tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers

from semipd_runtime.config import EngineConfig
from semipd_runtime.core_factory import create_core
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, load_weights


def emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def generate(core, prompts: list[list[int]], n: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    for i, p in enumerate(prompts):
        core.add_request(AddRequest(f"g{i}", p, CoreSampling(temperature=0.0, max_tokens=n, ignore_eos=True)))
    out: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    t0 = time.time()
    while core.has_work() or core.pending:
        for ev in core.step():
            out[ev.rid] += ev.token_ids
        if time.time() - t0 > 300:
            raise TimeoutError("generation did not finish in 300 s")
    return [out[f"g{i}"] for i in range(len(prompts))]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--partitions", nargs="+", default=["none", "green", "mps"])
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the code paths (--shape tiny)")
    ap.add_argument("--tp", type=int, default=1, help="N > 1: only the tensor-parallel check, TP=N vs TP=1")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and have < max(args.tp, 1):
        sys.exit(f"error: gpu_checks.py needs {max(args.tp, 1)} GPU(s) (--tp {args.tp}); {have} visible")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 ground truth means fp32
    rows: list[dict] = []
    cfg_dict = with_layers(SHAPES[args.shape], args.layers)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(args.device):
        hf32 = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    hf16 = transformers.LlamaForCausalLM(hf_cfg).to(args.device, torch.bfloat16).eval()
    hf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf32.state_dict().items()})
    mcfg = ModelConfig.from_dict(cfg_dict)
    models = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        models[name] = build_empty_model(mcfg, torch.device(args.device), dtype)
        load_weights(models[name], ((k, v.to(dtype)) for k, v in hf32.state_dict().items()), source="hf")
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(cfg_dict))
    g = torch.Generator().manual_seed(1)
    lens = [1, 17, 100, 513, 1500, 64, 300, 2048]
    prompts = [torch.randint(10, cfg_dict["vocab_size"], (n,), generator=g).tolist() for n in lens]

    def core_cfg(dtype: str, **kw: object) -> EngineConfig:
        return EngineConfig.from_knobs(model_path=str(model_dir), device=args.device, dtype=dtype,
                          max_model_len=4096, eos_token_ids=[], max_running_requests=16,
                          chunked_prefill_size=512, page_size=16, num_pages=2048, **kw)  # type: ignore[arg-type]

    unified = {d: create_core(core_cfg(d), model=models[d]) for d in models}
    ours = {d: generate(unified[d], prompts, args.new_tokens) for d in models}
    if args.tp > 1:
        tp_check(args, hf32, cfg_dict, model_dir, core_cfg, prompts, ours, rows)
        del models, unified
        finish(args, rows)
        return
    # 1. parity vs transformers fp32
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([p], device=args.device)
            ref = hf32(ids).logits[0, -1].float()
            ref_hf16 = hf16(ids).logits[0, -1].float()
            ref_tokens = hf32.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                       min_new_tokens=args.new_tokens, do_sample=False,
                                       pad_token_id=0)[0, len(p):].tolist()
        row: dict = {"check": "parity", "prompt_len": len(p), "hf_bf16_rel_err": rel_err(ref_hf16, ref)}
        for d, core in unified.items():
            slot = core.allocator.alloc(core.allocator.pages_needed(len(p)))
            logits = core.runner.forward([p], [0], core.allocator.req_to_page[slot : slot + 1], [0])[0]
            core.allocator.free(slot)
            got = ours[d][i]
            row[f"ours_{d}_rel_err"] = rel_err(logits, ref)
            row[f"ours_{d}_cosine"] = float(torch.nn.functional.cosine_similarity(logits.float(), ref, dim=0))
            row[f"ours_{d}_greedy_equal_prefix"] = next(
                (j for j, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), len(ref_tokens))
        row["ok"] = (row["ours_float32_rel_err"] < 1e-4 and row["ours_float32_greedy_equal_prefix"] == len(ref_tokens)
                     and row["ours_bfloat16_rel_err"] < 1.5 * row["hf_bf16_rel_err"] + 1e-3)
        emit(row, rows)
    # 2. decode through CUDA graphs vs eager decode (same model, same prompts)
    for d in models:
        eager = create_core(core_cfg(d, disable_cuda_graph=True), model=models[d])
        want = generate(eager, prompts, args.new_tokens)
        emit({"check": f"cuda_graph/{d}", "graphs_captured": len(unified[d].runner.graphs.graphs),
              "equal_requests": sum(a == b for a, b in zip(ours[d], want)), "of": len(want),
              "ok": d != "float32" or ours[d] == want}, rows)
        del eager
        serial = create_core(core_cfg(d, disable_overlap_schedule=True), model=models[d])
        want = generate(serial, prompts, args.new_tokens)
        emit({"check": f"overlap/{d}", "equal_requests": sum(a == b for a, b in zip(ours[d], want)), "of": len(want),
              "ok": d != "float32" or ours[d] == want}, rows)
        del serial
    # 3. semi-PD equivalence with unified
    for part in args.partitions:
        for d in models:
            try:
                core = create_core(core_cfg(d, mode="semi-pd", sm_partition=part, prefill_sm_percent=60,
                                            decode_sm_percent=40, prefill_placement="process"), model=models[d])
            except Exception as e:  # noqa: BLE001 - e.g. no MPS daemon
                emit({"check": f"semi-pd/{part}/{d}", "error": repr(e), "ok": False}, rows)
                continue
            try:
                got = generate(core, prompts, args.new_tokens)
                st = core.stats()
                emit({"check": f"semi-pd/{part}/{d}", "equal_requests": sum(a == b for a, b in zip(got, ours[d])),
                      "of": len(got), "prefill_sm": st.prefill_sm, "decode_sm": st.decode_sm,
                      "pages_used_after": st.pages_used,
                      "ok": st.pages_used == 0 and (d != "float32" or got == ours[d])}, rows)
            finally:
                core.close()
    finish(args, rows)


def tp_check(args: argparse.Namespace, hf32: torch.nn.Module, cfg_dict: dict, model_dir: Path,  # type: ignore[type-arg]
             core_cfg, prompts: list[list[int]], ours: dict[str, list[list[int]]],  # type: ignore[no-untyped-def]
             rows: list[dict]) -> None:
    """4. TP=N greedy equals TP=1 (ours[d]: the unified TP=1 core on the same weights)."""
    t0 = time.time()
    hf32.save_pretrained(model_dir)  # safetensors (fp32): every rank loads its shard, cast to its dtype
    (model_dir / "config.json").write_text(json.dumps(cfg_dict))
    print(f"weights saved to {model_dir} in {time.time() - t0:.0f} s", flush=True)
    modes = [("unified", {})] + [(f"semi-pd/{p}", {"mode": "semi-pd", "sm_partition": p, "prefill_sm_percent": 60,
                                                   "decode_sm_percent": 40})
                                 for p in args.partitions if p in ("none", "green")]
    for name, kw in modes:
        for d in ours:
            check = f"tp{args.tp}/{name}/{d}"
            t0 = time.time()
            try:
                core = create_core(core_cfg(d, tp_size=args.tp, **kw))
            except Exception as e:  # noqa: BLE001 - report, go on with the next mode
                emit({"check": check, "error": repr(e), "ok": False}, rows)
                continue
            try:
                got = generate(core, prompts, args.new_tokens)
                st = core.stats()
                emit({"check": check, "equal_requests": sum(a == b for a, b in zip(got, ours[d])), "of": len(got),
                      "equal_prefix_min": min(next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
                                              for g, w in zip(got, ours[d])),
                      "pages_used_after": st.pages_used, "seconds": round(time.time() - t0, 1),
                      "ok": st.pages_used == 0 and (d != "float32" or got == ours[d])}, rows)
            finally:
                core.close()


def finish(args: argparse.Namespace, rows: list[dict]) -> None:
    print("ALL OK" if all(r.get("ok") for r in rows) else "FAILED: " + ", ".join(
        r["check"] + (f"@{r['prompt_len']}" if "prompt_len" in r else "") for r in rows if not r.get("ok")))
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
        args.out.write_text(json.dumps({"device": device, "shape": args.shape,
                                        "layers": args.layers, "tp": args.tp, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
