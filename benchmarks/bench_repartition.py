"""Re-partition latency: request a new SM split -> new split in effect, while decode streams keep running.

    python benchmarks/bench_repartition.py --shape llama-3.1-8b --layers 4 --backend green --out $OUT/repartition.json

Builds a semi-PD core on random weights, keeps `--streams` requests decoding, then cycles through splits; for each
move it reports the latency the core measured (request -> standby ready and switched) and the wall time of the
step loop until `executor.split` shows the new split. Under `mps` the standby is a new process (it maps the
shared weights and KV pool) and only the prefill cap moves (the decode process keeps the cap it started with:
`--splits` are then prefill %), under `green` a thread on freshly built green contexts.
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
from model_shapes import SHAPES, with_layers

from semipd_runtime.config import EngineConfig
from semipd_runtime.core_factory import create_core
from semipd_runtime.messages import AddRequest, CoreSampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--backend", default="green", choices=["green", "mps", "none"])
    ap.add_argument("--splits", type=int, nargs="+", default=[30, 50, 70, 40, 60],
                    help="decode %% per move (mps: prefill %%; its decode cap stays at 50)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg_dict = with_layers(SHAPES[args.shape], args.layers)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(cfg_dict))
    cfg = EngineConfig.from_knobs(model_path=str(model_dir), device=args.device,
                                  dtype=str(dtype).removeprefix("torch."), max_model_len=4096, eos_token_ids=[],
                                  max_running_requests=args.streams + 4, page_size=16,
                                  num_pages=(args.streams + 2) * 4096 // 16, mode="semi-pd", sm_partition=args.backend,
                                  prefill_placement="process" if args.backend != "green" else "thread",
                                  prefill_sm_percent=50, decode_sm_percent=50, load_format="dummy")
    core = create_core(cfg)
    g = torch.Generator().manual_seed(0)
    for i in range(args.streams):
        core.add_request(AddRequest(f"s{i}", torch.randint(10, cfg_dict["vocab_size"], (256,), generator=g).tolist(),
                                    CoreSampling(temperature=0.0, max_tokens=3000, ignore_eos=True)))
    rows = []
    try:
        for _ in range(50):  # streams admitted and decoding
            core.step()
        for d in args.splits:
            want = (float(d), 50.0) if args.backend == "mps" else (100.0 - d, float(d))
            t0 = time.perf_counter()
            core.repartition(*want)
            steps = 0
            while core.executor.split != want or core.executor.in_transition:
                core.step()
                steps += 1
                if time.perf_counter() - t0 > args.timeout_s:
                    raise TimeoutError(f"split {want} not in effect after {args.timeout_s}s")
            wall = time.perf_counter() - t0
            st = core.stats()
            row = {"backend": args.backend, "prefill_percent": want[0], "decode_percent": want[1],
                   "prefill_sm": st.prefill_sm, "decode_sm": st.decode_sm,
                   "core_latency_ms": 1e3 * st.last_repartition_s,
                   "wall_ms": 1e3 * wall, "decode_steps_meanwhile": steps, "running": st.num_running}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for _ in range(10):  # decode in the new split (the decode graphs for it get captured here)
                core.step()
    finally:
        core.close()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                        "shape": args.shape, "layers": args.layers, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
