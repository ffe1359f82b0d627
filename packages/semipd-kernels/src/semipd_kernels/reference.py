"""Pure-torch reference twins of every kernel (CPU or GPU).

They define the semantics the Triton kernels are tested against and serve as the CPU backend. All math runs in
float32 and results come back in the input dtype. Clarity beats speed here, but nothing is quadratic in the
batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from semipd_kernels import checks
from semipd_kernels.rng import uniform_from_hash

__all__ = [
    "PROMPT_BIT",
    "apply_penalties",
    "apply_rotary",
    "apply_token_bitmask",
    "decode_attention",
    "fused_add_rms_norm",
    "linear",
    "prefill_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_store_kv",
    "sample",
    "silu_and_mul",
    "store_kv",
]


# -------------------- linear layers
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


# -------------------- norms
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    checks.check_norm(x, weight)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    checks.check_norm(x, weight)
    checks.check_same_shape("residual", residual, "x", x)
    # The sum is rounded to x.dtype first (as the unfused model does), then normalised.
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: Tensor) -> Tensor:
    checks.check_silu_and_mul(x)
    inter = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)


# -------------------- rotary
def _rope_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None,
                   device: torch.device | str | None) -> Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device, torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = "default" if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_scaling is None or rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        factor = float(rope_scaling["factor"])
        low_ff = float(rope_scaling["low_freq_factor"])
        high_ff = float(rope_scaling["high_freq_factor"])
        old_len = rope_scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"rope_scaling: unsupported rope_type {rope_type!r} (supported: default, linear, llama3)"
    )


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, base: float, rope_scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """float32 [max_positions, head_dim]: cos(pos * inv_freq) in the first half, sin in the second."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if max_positions <= 0:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    inv_freq = _rope_inv_freq(head_dim, base, rope_scaling, device)
    pos = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


def apply_rotary(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    checks.check_rotary(q, k, positions, cos_sin_cache)
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())
    cos, sin = cs[:, None, :half].float(), cs[:, None, half:].float()

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# -------------------- paged KV
def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write token t's K/V to flat slot slot_mapping[t]; negative slots (padding) are skipped."""
    checks.check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    hk, d = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, hk, d).index_copy_(0, slots, k[valid].to(k_cache.dtype))
    v_cache.view(-1, hk, d).index_copy_(0, slots, v[valid].to(v_cache.dtype))


def rotary_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
) -> Tensor:
    """apply_rotary then store_kv of the rotated k: returns rotated q, writes rotated k and v to the cache."""
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def _gather_pages(cache: Tensor, page_table: Tensor, num_pages: int) -> Tensor:
    """[B, num_pages * page_size, Hk, D] in float32; unused (-1) table entries read page 0 and are masked
    later."""
    pages = page_table[:, :num_pages].long().clamp(min=0)
    b = pages.shape[0]
    return cache[pages].reshape(b, num_pages * cache.shape[1], cache.shape[2], cache.shape[3]).float()


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor, scale: float
) -> Tensor:
    checks.check_decode(q, k_cache, v_cache, page_table, seq_lens)
    bsz, hq, d = q.shape
    hk, page_size = k_cache.shape[2], k_cache.shape[1]
    group = hq // hk
    num_pages = max(1, -(-int(seq_lens.max().item()) // page_size)) if bsz else 1
    keys = _gather_pages(k_cache, page_table, num_pages)  # [B, L, Hk, D]
    vals = _gather_pages(v_cache, page_table, num_pages)
    qf = q.float().view(bsz, hk, group, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, keys) * scale
    pos = torch.arange(keys.shape[1], device=q.device)
    mask = pos[None, :] < seq_lens.long()[:, None]  # [B, L]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, vals)
    return out.reshape(bsz, hq, d).to(q.dtype)


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    checks.check_prefill(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens)
    hq, d = q.shape[1], q.shape[2]
    hk, page_size = k_cache.shape[2], k_cache.shape[1]
    group = hq // hk
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, kv_len in enumerate(lens):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        if q_len > kv_len:
            raise ValueError(f"seq_lens[{b}]={kv_len} is shorter than its {q_len} new tokens (cu_seqlens_q)")
        num_pages = -(-kv_len // page_size)
        keys = _gather_pages(k_cache, page_table[b : b + 1], num_pages)[0, :kv_len]  # [L, Hk, D]
        vals = _gather_pages(v_cache, page_table[b : b + 1], num_pages)[0, :kv_len]
        qf = q[q_start:q_end].float().view(q_len, hk, group, d)
        scores = torch.einsum("qhgd,lhd->hgql", qf, keys) * scale
        # New token i sits at absolute position kv_len - q_len + i and sees keys 0..that position.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgql,lhd->qhgd", probs, vals)
        out[q_start:q_end] = o.reshape(q_len, hq, d).to(q.dtype)
    return out


# -------------------- sampling
def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seeds: Tensor,
    steps: Tensor,
) -> Tensor:
    """One token per row. Semantics (shared bit-for-bit in spirit with the Triton kernel):

    z = logits / T; e = exp(z - max z). top-k keeps z >= the k-th largest z (ties kept); top-p then keeps z >=
    the largest threshold whose kept mass (among the top-k survivors) is >= top_p of their total; min-p keeps
    e >= min_p. Among survivors the token is argmax(z - log(-log(u))), u = uniform_from_hash(seed, step,
    index) (Gumbel-max, i.e. an exponential race). temperature <= 0 gives argmax(logits).
    """
    checks.check_sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
    bsz, vocab = logits.shape
    if bsz == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    logits = logits.float()
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    z = logits / temp[:, None]
    zmax = z.max(dim=1, keepdim=True).values
    e = torch.exp(z - zmax)
    neg_inf = torch.full_like(zmax, float("-inf"))

    sorted_z, _ = z.sort(dim=1, descending=True)
    k = top_k.long()
    k_on = ((k > 0) & (k < vocab))[:, None]
    kth = sorted_z.gather(1, (k.clamp(1, vocab) - 1)[:, None])
    t_k = torch.where(k_on, kth, neg_inf)

    e_sorted = torch.exp(sorted_z - zmax)
    e_sorted = torch.where(sorted_z >= t_k, e_sorted, torch.zeros_like(e_sorted))
    total = e_sorted.sum(dim=1, keepdim=True)
    target = top_p.float()[:, None] * total
    cum = e_sorted.cumsum(dim=1)
    first = (cum < target).sum(dim=1, keepdim=True).clamp(max=vocab - 1)
    p_on = (top_p < 1.0)[:, None]
    t_p = torch.where(p_on, sorted_z.gather(1, first), neg_inf)

    # a banned token (-inf, e.g. a grammar mask) never runs: where u rounds to 1.0 its score would be NaN, which
    # argmax picks (the Triton race compares with '>', which NaN never wins)
    keep = (z >= t_k) & (z >= t_p) & (e >= min_p.float()[:, None]) & (z > float("-inf"))
    idx = torch.arange(vocab, device=logits.device, dtype=torch.int64)
    u = uniform_from_hash(seeds.long()[:, None], steps.long()[:, None], idx[None, :])
    score = torch.where(keep, z - torch.log(-torch.log(u)), torch.full_like(z, float("-inf")))
    sampled = score.argmax(dim=1)
    return torch.where(greedy, logits.argmax(dim=1), sampled)


# -------------------- structured output
def apply_token_bitmask(logits: Tensor, bitmask: Tensor, rows: Tensor) -> None:
    """In place: logits[rows[i], v] = -inf where bit v % 32 of bitmask[i, v // 32] is 0 (a banned token), and
    for every v >= 32 * bitmask.shape[1]. Rows not in `rows` are untouched (requests without a grammar)."""
    checks.check_token_bitmask(logits, bitmask, rows)
    if rows.numel() == 0:
        return
    g, vocab = rows.shape[0], logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(g, -1)  # [G, 32 * words], bit v = token v
    allowed = torch.zeros((g, vocab), dtype=torch.bool, device=logits.device)
    n = min(vocab, bits.shape[1])
    allowed[:, :n] = bits[:, :n] != 0
    r = rows.long()
    logits.index_copy_(0, r, logits.index_select(0, r).masked_fill_(~allowed, float("-inf")))


# -------------------- penalties
# token_counts packs two things per (request, token) into one int32 so the state is one [R, V] tensor: the low
# 30 bits count the token's occurrences in the output, bit 30 says whether it occurs in the prompt
PROMPT_BIT = 1 << 30


def apply_penalties(
    logits: Tensor,
    token_counts: Tensor,
    rows: Tensor,
    presence: Tensor,
    frequency: Tensor,
    repetition: Tensor,
) -> Tensor:
    """float32 [B, V]: logits with vLLM's (and OpenAI's) penalties, a new tensor. Row b reads its state from
    token_counts[rows[b]] (see PROMPT_BIT); rows[b] < 0 copies the row unchanged. For a token seen in the prompt or
    the output, a positive logit is divided by repetition[b], a negative one multiplied by it; then
    frequency[b] * (output count) and presence[b] * (count > 0) are subtracted."""
    checks.check_penalties(logits, token_counts, rows, presence, frequency, repetition)
    x = logits.float()
    if x.shape[0] == 0:
        return x.clone()
    state = token_counts.index_select(0, rows.long().clamp(min=0))
    count = (state & (PROMPT_BIT - 1)).float()
    rep = repetition.float()[:, None]
    out = torch.where(state != 0, torch.where(x > 0, x / rep, x * rep), x)
    out = out - frequency.float()[:, None] * count
    out = out - torch.where(count > 0, presence.float()[:, None], torch.zeros_like(count))
    return torch.where((rows >= 0)[:, None], out, x)
