"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm).

The forward reads like a plain transformer; all paging lives in `AttentionMetadata` and the kernel ops.
Built with a `TensorParallel` (tp), it is one rank's shard (`parallel/shard.py`: `cfg` is then the rank's
view): an all-reduce follows o_proj and down_proj, the embedding and LM head hold a vocabulary slice. Without
one it runs no collective and no extra op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semipd_kernels import ops
from semipd_runtime.forward_batch import AttentionMetadata
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.parallel.shard import TensorParallel


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.layer_id, self.tp = layer_id, tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, meta: AttentionMetadata) -> Tensor:
        t = x.shape[0]
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim))[0].view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim))[0].view_as(k)
        k_cache, v_cache = meta.kv_pool.k(self.layer_id), meta.kv_pool.v(self.layer_id)
        q = ops.rotary_store_kv(
            q, k, v, meta.positions, meta.cos_sin_cache, k_cache, v_cache, meta.slot_mapping
        )
        if meta.is_decode:
            o = ops.decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens, self.scale)
        elif meta.num_decode:
            d, table, lens = meta.num_decode, meta.page_table, meta.seq_lens
            assert meta.prefill_cu_seqlens_q is not None
            o = torch.cat([
                ops.decode_attention(q[:d], k_cache, v_cache, table[:d], lens[:d], self.scale),
                ops.prefill_attention(q[d:], k_cache, v_cache, table[d:], meta.prefill_cu_seqlens_q, lens[d:],
                                      self.scale),
            ])
        else:
            o = ops.prefill_attention(
                q, k_cache, v_cache, meta.page_table, meta.cu_seqlens_q, meta.seq_lens, self.scale
            )
        out = ops.linear(o.reshape(t, self.q_size), self.o_proj.weight)
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = ops.linear(ops.silu_and_mul(ops.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, tp)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, residual: Tensor | None, meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """One class for every supported architecture; ModelConfig switches bias / q-k norm / tying."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config, self.tp = cfg, tp
        vocab_rows = cfg.vocab_size if tp is None else tp.vocab_range(cfg.vocab_size)[2]
        self.embed_tokens = nn.Embedding(vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab_rows, bias=False)
        )

    def forward(self, input_ids: Tensor, meta: AttentionMetadata) -> Tensor:
        """Returns float32 logits for the rows `meta.logits_indices` only (tokens that get sampled)."""
        x = self.embed_tokens(input_ids) if self.tp is None else self._embed_shard(input_ids, self.tp)
        residual: Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, meta)
        x, _ = self.norm(x, residual)
        x = x.index_select(0, meta.logits_indices)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(x, weight)
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits.float()

    def _embed_shard(self, input_ids: Tensor, tp: TensorParallel) -> Tensor:
        """Masked lookup in this rank's vocabulary slice; the all-reduce adds in the rank holding each id."""
        start, end, _ = tp.vocab_range(self.config.vocab_size)
        mine = (input_ids >= start) & (input_ids < end)
        x = self.embed_tokens(torch.where(mine, input_ids - start, 0))
        return tp.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))
