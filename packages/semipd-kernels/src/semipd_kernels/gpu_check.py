"""Kernel-vs-reference comparisons at real shapes (bf16, head_dim 128, 32 q / 8 kv heads, contexts to 32k).

Run on a GPU through `python benchmarks/bench_kernels.py --check`. Each check returns a dict with the error
figures and `ok`; the reference always runs in float32 on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from semipd_kernels import reference as ref
from semipd_kernels.testing import paged_kv

HQ, HK, D = 32, 8, 128


def _errors(name: str, got: Tensor, want: Tensor, tol: float) -> dict[str, Any]:
    got, want = got.float(), want.float()
    max_abs = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    ok = bool(torch.allclose(got, want, atol=tol, rtol=tol)) and bool(torch.isfinite(got).all())
    return {"check": name, "max_abs_err": max_abs, "ref_max_abs": scale,
            "rel_err": max_abs / scale if scale else 0.0, "tol": tol, "ok": ok}


def check_decode(device: str, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    from semipd_kernels.triton.decode_attention import decode_attention

    out = []
    for seq_lens, page_size in (([32768, 1, 4097, 1000], 16), ([4096] * 64, 16), ([777, 33, 12000], 1)):
        g = torch.Generator().manual_seed(len(seq_lens))
        kc, vc, table = paged_kv(seq_lens, page_size, HK, D, dtype, device, generator=g)
        q = (torch.randn(len(seq_lens), HQ, D, generator=g) * 3).to(dtype=dtype, device=device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        got = decode_attention(q, kc, vc, table, lens, D**-0.5)
        want = ref.decode_attention(q.float(), kc.float(), vc.float(), table, lens, D**-0.5)
        name = f"decode B={len(seq_lens)} max_ctx={max(seq_lens)} page={page_size}"
        out.append(_errors(name, got, want, 2e-2))
    return out


def check_prefill(device: str, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    from semipd_kernels.triton.prefill_attention import prefill_attention

    out = []
    cases = [
        ([(0, 4096)], 16),  # one plain prompt
        ([(8192, 2048)], 16),  # a chunk after 8k of cached prefix
        ([(0, 1000), (30000, 1), (511, 700), (2000, 1)], 16),  # mixed chunked prefill + decode rows
        ([(100, 300), (0, 129)], 1),
    ]
    for prefix_and_new, page_size in cases:
        g = torch.Generator().manual_seed(len(prefix_and_new) + page_size)
        seq_lens = [p + n for p, n in prefix_and_new]
        kc, vc, table = paged_kv(seq_lens, page_size, HK, D, dtype, device, generator=g)
        cu = [0]
        for _, n in prefix_and_new:
            cu.append(cu[-1] + n)
        q = (torch.randn(cu[-1], HQ, D, generator=g) * 3).to(dtype=dtype, device=device)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        got = prefill_attention(q, kc, vc, table, cu_t, lens, D**-0.5)
        want = ref.prefill_attention(q.float(), kc.float(), vc.float(), table, cu_t, lens, D**-0.5)
        out.append(_errors(f"prefill {prefix_and_new} page={page_size}", got, want, 2e-2))
    return out


def check_elementwise(device: str, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    from semipd_kernels.triton import activation, kv_store, norm, rotary

    g = torch.Generator().manual_seed(0)
    t, hidden, inter = 4096, 4096, 14336
    x = torch.randn(t, hidden, generator=g).to(dtype=dtype, device=device)
    r = torch.randn(t, hidden, generator=g).to(dtype=dtype, device=device)
    w = torch.rand(hidden, generator=g).to(dtype=dtype, device=device)
    res = [_errors("rms_norm", norm.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), 2e-2)]
    got_n, got_s = norm.fused_add_rms_norm(x, r, w, 1e-5)
    want_n, want_s = ref.fused_add_rms_norm(x, r, w, 1e-5)
    res += [_errors("fused_add_rms_norm.out", got_n, want_n, 2e-2),
            _errors("fused_add_rms_norm.residual", got_s, want_s, 0.0)]
    gu = torch.randn(t, 2 * inter, generator=g).to(dtype=dtype, device=device)
    res.append(_errors("silu_and_mul", activation.silu_and_mul(gu), ref.silu_and_mul(gu), 2e-2))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cache = ref.rope_cos_sin_cache(D, 131072, 500000.0, scaling, device=device)
    qkv = torch.randn(t, (HQ + 2 * HK) * D, generator=g).to(dtype=dtype, device=device)
    q, k = qkv[:, : HQ * D].view(t, HQ, D), qkv[:, HQ * D : (HQ + HK) * D].view(t, HK, D)
    pos = torch.randint(0, 131072, (t,), generator=g).to(device)
    (gq, gk), (wq, wk) = rotary.apply_rotary(q, k, pos, cache), ref.apply_rotary(q, k, pos, cache)
    res += [_errors("rotary.q", gq, wq, 2e-2), _errors("rotary.k", gk, wk, 2e-2)]
    caches = [torch.zeros(600, 16, HK, D, dtype=dtype, device=device) for _ in range(4)]
    slots = torch.randperm(600 * 16, generator=g)[:t].to(device)
    kv_store.store_kv(k, k, caches[0], caches[1], slots)
    ref.store_kv(k, k, caches[2], caches[3], slots)
    res.append(_errors("store_kv", caches[0], caches[2], 0.0))
    from semipd_kernels.triton.rotary_kv import rotary_store_kv

    v = qkv[:, (HQ + HK) * D :].view(t, HK, D)
    fused = [torch.zeros(600, 16, HK, D, dtype=dtype, device=device) for _ in range(4)]
    slots[::7] = -1  # padded rows: nothing stored
    got_q = rotary_store_kv(q, k, v, pos, cache, fused[0], fused[1], slots)
    want_q, want_k = ref.apply_rotary(q, k, pos, cache)
    ref.store_kv(want_k, v, fused[2], fused[3], slots)
    res += [_errors("rotary_store_kv.q", got_q, want_q, 2e-2),
            _errors("rotary_store_kv.k_cache", fused[0], fused[2], 2e-2),
            _errors("rotary_store_kv.v_cache", fused[1], fused[3], 0.0)]
    return res


def check_sampling(device: str) -> list[dict[str, Any]]:
    from semipd_kernels.triton.sampling import sample

    g = torch.Generator().manual_seed(1)
    bsz, vocab = 256, 128256
    logits = (torch.randn(bsz, vocab, generator=g) * 4).to(device)
    temperature = torch.rand(bsz, generator=g) + 0.2
    temperature[::8] = 0
    top_p = torch.rand(bsz, generator=g)
    top_p[1::3] = 1.0
    min_p = torch.rand(bsz, generator=g) * 0.2
    min_p[::2] = 0.0
    args = [temperature, torch.randint(0, 200, (bsz,), generator=g, dtype=torch.int32), top_p, min_p,
            torch.randint(0, 2**62, (bsz,), generator=g), torch.randint(0, 10**6, (bsz,), generator=g)]
    temp, top_k, top_p, min_p, seeds, steps = (a.to(device) for a in args)
    got = sample(logits, temp, top_k, top_p, min_p, seeds, steps)
    want = ref.sample(logits, temp, top_k, top_p, min_p, seeds, steps)
    same = (got == want).float().mean().item()
    return [{"check": f"sample B={bsz} V={vocab}", "same_token_rate": same, "ok": same == 1.0}]


def check_penalties(device: str) -> list[dict[str, Any]]:
    from semipd_kernels.triton.penalties import apply_penalties

    g = torch.Generator().manual_seed(3)
    bsz, vocab, num_rows = 64, 128256, 80
    counts = torch.randint(0, 3, (num_rows, vocab), generator=g, dtype=torch.int32)
    counts[torch.rand(num_rows, vocab, generator=g) < 0.9] = 0
    counts |= (torch.rand(num_rows, vocab, generator=g) < 0.05).int() * ref.PROMPT_BIT
    rows = torch.randperm(num_rows, generator=g)[:bsz]
    rows[::7] = -1
    logits, counts, rows, presence, frequency, repetition = (a.to(device) for a in (
        torch.randn(bsz, vocab, generator=g) * 4, counts, rows, torch.rand(bsz, generator=g) * 4 - 2,
        torch.rand(bsz, generator=g) * 4 - 2, torch.rand(bsz, generator=g) * 2 + 0.1))
    got = apply_penalties(logits, counts, rows, presence, frequency, repetition)
    want = ref.apply_penalties(logits, counts, rows, presence, frequency, repetition)
    # fp32 throughout; the GPU may fuse a multiply-subtract, hence a tolerance of a few ulps
    return [_errors(f"penalties B={bsz} V={vocab}", got, want, 1e-5)]


def check_gemm(device: str, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    from semipd_kernels.triton.gemm import linear

    g = torch.Generator().manual_seed(2)
    res = []
    for m, n, k, sms in ((64, 6144, 4096, 132), (8192, 28672, 4096, 66), (333, 4096, 14336, 33)):
        x = torch.randn(m, k, generator=g).to(dtype=dtype, device=device)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype=dtype, device=device)
        got = linear(x, w, num_sms=sms)
        want = torch.nn.functional.linear(x.float(), w.float())
        res.append(_errors(f"gemm {m}x{n}x{k} sms={sms}", got, want, 3e-2))
    return res


CHECKS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "decode": check_decode, "prefill": check_prefill, "elementwise": check_elementwise,
    "sampling": check_sampling, "penalties": check_penalties, "gemm": check_gemm,
}


def run_all(device: str = "cuda") -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for name, fn in CHECKS.items():
        try:
            results += fn(device)
        except Exception as e:  # noqa: BLE001 - one broken kernel must not hide the others' results
            results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache() if device == "cuda" else None
    return results
