"""A mixed step (decode rows + prefill chunks) runs its one-token rows through the decode kernel and the rest
through the prefill kernel; the result must equal one prefill-kernel pass over the whole batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_parity_random import write_random_model

from semipd_memory import KVPool
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.loader import load_model


@pytest.mark.parametrize("layout", ["decode+prefill", "decode+chunk-after-prefix", "one-token-chunk-first"])
def test_split_attention_equals_single_prefill_pass(tmp_path: Path, layout: str) -> None:
    write_random_model("llama31-untied", tmp_path)
    model = load_model(tmp_path, "cpu", torch.float32)
    cfg = model.config
    page = 4
    pool = KVPool(cfg.num_layers, 64, page, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    for layer in range(cfg.num_layers):  # a cached past for the decode rows / the chunk's prefix
        pool.k(layer).normal_()
        pool.v(layer).normal_()
    runner = ModelRunner(model, pool, page, 128)
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()

    chunks, starts = {
        "decode+prefill": ([toks(1), toks(1), toks(9)], [13, 6, 0]),
        "decode+chunk-after-prefix": ([toks(1), toks(5)], [21, 8]),
        "one-token-chunk-first": ([toks(1), toks(7), toks(1)], [0, 3, 9]),
    }[layout]
    table = torch.arange(3 * 10, dtype=torch.int32).view(3, 10)[: len(chunks)]
    rows = list(range(len(chunks)))
    snapshot = [(pool.k(i).clone(), pool.v(i).clone()) for i in range(cfg.num_layers)]

    ids, meta = runner.build_metadata(chunks, starts, table, rows)
    assert meta.num_decode == (1 if layout != "decode+prefill" else 2) and not meta.is_decode
    with torch.inference_mode():
        split = model(ids, meta)
        for i, (k, v) in enumerate(snapshot):
            pool.k(i).copy_(k)
            pool.v(i).copy_(v)
        meta.num_decode, meta.prefill_cu_seqlens_q = 0, None  # the whole batch through the prefill kernel
        whole = model(ids, meta)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
