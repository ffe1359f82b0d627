"""ModelRunner: owns the model, the KV pool and the rotary table; turns a scheduled batch into one forward pass."""

from __future__ import annotations

import torch
from torch import Tensor

from semipd_kernels import ops
from semipd_memory import KVPool, PageAllocator
from semipd_runtime.forward_batch import AttentionMetadata
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.request import Request


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_pool: KVPool, allocator: PageAllocator, max_model_len: int):
        cfg = model.config
        self.model, self.kv_pool, self.allocator = model, kv_pool, allocator
        self.device = next(model.parameters()).device
        self.page_size = allocator.page_size
        self.cos_sin_cache = ops.rope_cos_sin_cache(
            cfg.head_dim,
            max(max_model_len, cfg.max_position_embeddings),
            cfg.rope_theta,
            cfg.rope_scaling,
            device=self.device,
        )

    def build_metadata(
        self, requests: list[Request], num_new: list[int], sample_rows: list[int]
    ) -> tuple[Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        for req, n in zip(requests, num_new):
            ids += req.token_slice(req.num_computed, req.num_computed + n)
            positions += range(req.num_computed, req.num_computed + n)
        dev, ps = self.device, self.page_size
        cu = [0]
        for n in num_new:
            cu.append(cu[-1] + n)
        seq_lens_list = [r.num_computed + n for r, n in zip(requests, num_new)]
        max_pages = -(-max(seq_lens_list) // ps)
        slots = torch.tensor([r.slot for r in requests], dtype=torch.long, device=dev)
        page_table = self.allocator.req_to_page.index_select(0, slots)[:, :max_pages].contiguous()
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        tok_req = torch.repeat_interleave(
            torch.arange(len(requests), device=dev), torch.tensor(num_new, device=dev)
        )
        slot_mapping = page_table[tok_req, pos // ps].long() * ps + pos % ps
        meta = AttentionMetadata(
            positions=pos,
            slot_mapping=slot_mapping,
            page_table=page_table,
            seq_lens=torch.tensor(seq_lens_list, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor([cu[i + 1] - 1 for i in sample_rows], dtype=torch.long, device=dev),
            is_decode=all(n == 1 for n in num_new),
            kv_pool=self.kv_pool,
            cos_sin_cache=self.cos_sin_cache,
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), meta

    @torch.inference_mode()
    def forward(self, requests: list[Request], num_new: list[int], sample_rows: list[int]) -> Tensor:
        input_ids, meta = self.build_metadata(requests, num_new, sample_rows)
        return self.model(input_ids, meta)
