"""Correctness on the GPU, at real shapes in bf16 (run through the device tool; prints JSON lines).

    python benchmarks/gpu_checks.py --layers 4 --out $OUT/gpu_checks.json

1. parity: our forward vs transformers on the same random Llama-3.1-8B-shaped weights (logits close; greedy
   tokens equal for the first tokens), through the kernels the backend switch picks on CUDA.
2. semi-PD: greedy outputs of semi-PD (green / mps / none) equal unified mode for mixed-length prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers  # noqa: E402

from semipd_runtime.core import CoreConfig  # noqa: E402
from semipd_runtime.core_factory import create_core  # noqa: E402
from semipd_runtime.messages import AddRequest, CoreSampling  # noqa: E402
from semipd_runtime.models.config import ModelConfig  # noqa: E402
from semipd_runtime.models.loader import build_empty_model, load_weights  # noqa: E402


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


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--partitions", nargs="+", default=["none", "green", "mps"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows: list[dict] = []
    cfg_dict = with_layers(SHAPES[args.shape], args.layers)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    model = build_empty_model(ModelConfig.from_dict(cfg_dict), torch.device("cuda"), torch.bfloat16)
    load_weights(model, hf.state_dict().items(), source="transformers")
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(cfg_dict))
    g = torch.Generator().manual_seed(1)
    lens = [1, 17, 100, 513, 1500, 64, 300, 2048]
    prompts = [torch.randint(10, cfg_dict["vocab_size"], (n,), generator=g).tolist() for n in lens]

    def core_cfg(**kw: object) -> CoreConfig:
        return CoreConfig(model_path=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=4096,
                          eos_token_ids=[], max_running_requests=16, chunked_prefill_size=512, page_size=16,
                          num_pages=2048, **kw)

    unified = create_core(core_cfg(), model=model)
    ours = generate(unified, prompts, args.new_tokens)
    # 1. parity vs transformers: logits of the last prompt token, and greedy tokens
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            ids = torch.tensor([p], device="cuda")
            ref_logits = hf(ids).logits[0, -1].float()
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        slot = unified.allocator.alloc(unified.allocator.pages_needed(len(p)))
        logits = unified.runner.forward([p], [0], unified.allocator.req_to_page[slot : slot + 1], [0])[0]
        unified.allocator.free(slot)
        err = float((logits - ref_logits).abs().max())
        agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        emit({"check": "parity", "prompt_len": len(p), "greedy_equal_prefix": agree, "of": len(ref),
              "logits_max_abs_err": err, "logits_max_abs": float(ref_logits.abs().max()),
              "cosine": float(torch.nn.functional.cosine_similarity(logits, ref_logits, dim=0))}, rows)
    # 2. semi-PD equivalence
    for part in args.partitions:
        try:
            core = create_core(core_cfg(mode="semi-pd", sm_partition=part, prefill_sm_percent=60,
                                        decode_sm_percent=40, prefill_placement="process"), model=model)
        except Exception as e:  # e.g. no MPS daemon
            emit({"check": f"semi-pd/{part}", "error": repr(e)}, rows)
            continue
        try:
            got = generate(core, prompts, args.new_tokens)
            st = core.stats()
            emit({"check": f"semi-pd/{part}", "equal_to_unified": got == ours,
                  "equal_requests": sum(a == b for a, b in zip(got, ours)), "of": len(ours),
                  "prefill_sm": st.prefill_sm, "decode_sm": st.decode_sm, "pages_used_after": st.pages_used}, rows)
        finally:
            core.close()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape,
                                        "layers": args.layers, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
