"""The torch references against independent formulations (transformers' rope, per-token attention loops),
the sampling semantics, and the backend switch."""

from __future__ import annotations

import math

import pytest
import torch

from semipd_kernels import ops
from semipd_kernels import reference as ref
from semipd_kernels.testing import paged_kv

LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


@pytest.mark.parametrize(
    "scaling", [None, {"rope_type": "default"}, LLAMA3, {"type": "linear", "factor": 4.0}], ids=str
)
def test_rope_cache_matches_transformers(scaling: dict | None) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, theta, max_pos = 128, 500000.0, 1024
    cfg = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=max_pos,
    )
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :].float()
    cache = ref.rope_cos_sin_cache(head_dim, max_pos, theta, scaling)
    assert cache.dtype == torch.float32 and cache.shape == (max_pos, head_dim)
    torch.testing.assert_close(cache[:, : head_dim // 2], freqs.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[:, head_dim // 2 :], freqs.sin(), atol=1e-6, rtol=0)


def test_rope_unknown_type_is_named() -> None:
    with pytest.raises(ValueError, match="yarn"):
        ref.rope_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_apply_rotary_matches_rotate_half() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 64, generator=g), torch.randn(5, 2, 64, generator=g)
    pos = torch.tensor([0, 3, 7, 1, 15])
    cache = ref.rope_cos_sin_cache(64, 16, 10000.0)
    cos = torch.cat([cache[pos, :32]] * 2, dim=-1)[:, None]
    sin = torch.cat([cache[pos, 32:]] * 2, dim=-1)[:, None]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x[..., 32:], x[..., :32]], dim=-1)

    q_out, k_out = ref.apply_rotary(q, k, pos, cache)
    torch.testing.assert_close(q_out, q * cos + rotate_half(q) * sin)
    torch.testing.assert_close(k_out, k * cos + rotate_half(k) * sin)
    torch.testing.assert_close(q_out[0], q[0])  # position 0 is the identity


def test_rms_norm_formula() -> None:
    x = torch.tensor([[3.0, 4.0]])
    out = ref.rms_norm(x, torch.tensor([1.0, 2.0]), 0.0)
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(out, torch.tensor([[3 / rms, 8 / rms]]))
    normed, summed = ref.fused_add_rms_norm(x, x, torch.ones(2), 0.0)
    torch.testing.assert_close(summed, 2 * x)
    torch.testing.assert_close(normed, ref.rms_norm(2 * x, torch.ones(2), 0.0))


def test_silu_and_mul_formula() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0, 5.0]])
    expected = torch.tensor([[1 / (1 + math.exp(-1)) * 3, -2 / (1 + math.exp(2)) * 5]])
    torch.testing.assert_close(ref.silu_and_mul(x), expected)


def _attend_one(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, D], keys/vals [L, Hk, D] -> [Hq, D], written as a plain loop over heads."""
    group = q.shape[0] // keys.shape[1]
    out = []
    for h in range(q.shape[0]):
        kh, vh = keys[:, h // group], vals[:, h // group]
        w = torch.softmax((kh @ q[h]) * scale, dim=0)
        out.append(w @ vh)
    return torch.stack(out)


def _token_kv(cache: torch.Tensor, table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    ps = cache.shape[1]
    return torch.stack([cache[table[b, t // ps], t % ps] for t in range(length)])


def test_decode_and_prefill_reference_match_per_token_loops() -> None:
    g = torch.Generator().manual_seed(1)
    seq_lens, q_lens, page_size, hk, group, d = [5, 1, 12], [2, 1, 4], 4, 2, 3, 16
    k_cache, v_cache, table = paged_kv(seq_lens, page_size, hk, d, torch.float32, "cpu", generator=g)
    scale = d**-0.5
    # decode: one query per request at the last position
    q = torch.randn(3, hk * group, d, generator=g)
    out = ref.decode_attention(q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32), scale)
    for b, n in enumerate(seq_lens):
        exp = _attend_one(q[b], _token_kv(k_cache, table, b, n), _token_kv(v_cache, table, b, n), scale)
        torch.testing.assert_close(out[b], exp)
    # prefill: the new tokens are the last q_len positions of each sequence, causal
    cu = torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    qp = torch.randn(7, hk * group, d, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    outp = ref.prefill_attention(qp, k_cache, v_cache, table, cu, lens, scale)
    for b, (n, m) in enumerate(zip(seq_lens, q_lens)):
        for i in range(m):
            visible = n - m + i + 1
            exp = _attend_one(
                qp[cu[b] + i], _token_kv(k_cache, table, b, visible), _token_kv(v_cache, table, b, visible),
                scale,
            )
            torch.testing.assert_close(outp[cu[b] + i], exp)


def _sample_args(b: int, **kw: object) -> dict[str, torch.Tensor]:
    args = {
        "temperature": torch.ones(b), "top_k": torch.zeros(b, dtype=torch.int32), "top_p": torch.ones(b),
        "min_p": torch.zeros(b), "seeds": torch.arange(b, dtype=torch.int64),
        "steps": torch.zeros(b, dtype=torch.int64),
    }
    args.update(kw)  # type: ignore[arg-type]
    return args


def test_sample_greedy_is_argmax() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    tokens = ref.sample(logits, **_sample_args(4, temperature=torch.zeros(4)))
    assert tokens.dtype == torch.int64 and torch.equal(tokens, logits.argmax(dim=1))


def test_sample_filters_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].repeat(400, 1)
    seeds = torch.arange(400, dtype=torch.int64)
    two = torch.full((400,), 2, dtype=torch.int32)
    top_k = ref.sample(logits, **_sample_args(400, seeds=seeds, top_k=two))
    assert set(top_k.tolist()) == {0, 1}
    top_p = ref.sample(logits, **_sample_args(400, seeds=seeds, top_p=torch.full((400,), 0.79)))
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.79 needs exactly the top two
    min_p = ref.sample(logits, **_sample_args(400, seeds=seeds, min_p=torch.full((400,), 0.31)))
    assert set(min_p.tolist()) == {0, 1}  # 0.15 / 0.5 = 0.3 < 0.31 drops tokens 2 and 3
    min_p = ref.sample(logits, **_sample_args(400, seeds=seeds, min_p=torch.full((400,), 0.29)))
    assert set(min_p.tolist()) == {0, 1, 2}


def test_sample_frequencies_follow_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 20000
    tokens = ref.sample(torch.log(probs)[None].repeat(n, 1), **_sample_args(n, seeds=torch.arange(n) * 7919))
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_sample_row_depends_only_on_its_own_inputs() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g)
    seeds = torch.randint(-(2**62), 2**62, (6,), generator=g)
    args = _sample_args(6, seeds=seeds, steps=torch.arange(6) * 11)
    tokens = ref.sample(logits, **args)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    permuted = ref.sample(logits[perm], **{k: v[perm] for k, v in args.items()})
    assert torch.equal(permuted, tokens[perm])
    alone = ref.sample(logits[2:3], **{k: v[2:3] for k, v in args.items()})
    assert alone.item() == tokens[2].item()
    other_step = ref.sample(logits, **{**args, "steps": args["steps"] + 1})
    assert not torch.equal(other_step, tokens)  # a new step draws new noise


def test_sample_rejects_bad_args() -> None:
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="top_k"):
        ref.sample(logits, **_sample_args(2, top_k=torch.zeros(3, dtype=torch.int32)))
    with pytest.raises(ValueError, match="seeds"):
        ref.sample(logits, **_sample_args(2, seeds=torch.zeros(2, dtype=torch.int32)))


def test_backend_switch() -> None:
    assert ops.get_backend() in ops.BACKENDS
    before = ops.get_backend()
    try:
        ops.set_backend("torch")
        assert ops.backend_for("rms_norm", torch.zeros(1)) == "torch"
        ops.set_backend("auto")
        assert ops.backend_for("rms_norm", torch.zeros(1)) == "torch"  # CPU tensors -> reference
        with pytest.raises(ValueError, match="backend"):
            ops.set_backend("cuda")
    finally:
        ops.set_backend(before)
