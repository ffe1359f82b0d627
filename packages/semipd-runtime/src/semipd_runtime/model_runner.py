"""ModelRunner: owns the model, the KV pool view and the rotary table; turns token chunks + page tables into one
forward pass. It allocates nothing in the pool: callers say which pages each request's tokens live in."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from semipd_kernels import ops
from semipd_memory import KVPool
from semipd_runtime.cuda_graph import DecodeGraphRunner
from semipd_runtime.forward_batch import AttentionMetadata, fill_placeholders, to_device, to_device_parts
from semipd_runtime.messages import CoreSampling
from semipd_runtime.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, kv_pool: KVPool, page_size: int, max_model_len: int,
        cuda_graph_max_bs: int = 0, graph_replay: bool = True,
    ) -> None:
        """cuda_graph_max_bs > 0: decode batches up to that size run as CUDA graphs (CUDA only, unless
        graph_replay=False, which runs the same padded static-buffer forward eagerly: tests)."""
        cfg = model.config
        self.model, self.kv_pool, self.page_size = model, kv_pool, page_size
        self.device = next(model.parameters()).device
        self.cos_sin_cache = ops.rope_cos_sin_cache(
            cfg.head_dim,
            max(max_model_len, cfg.max_position_embeddings),
            cfg.rope_theta,
            cfg.rope_scaling,
            device=self.device,
        )
        self.graphs: DecodeGraphRunner | None = None
        if cuda_graph_max_bs > 0 and (self.device.type == "cuda" or not graph_replay):
            self.graphs = DecodeGraphRunner(
                model, kv_pool, self.cos_sin_cache, page_size, -(-max_model_len // page_size),
                cuda_graph_max_bs, replay=graph_replay and self.device.type == "cuda",
            )

    def page_table_from_rows(self, rows: list[list[int]]) -> Tensor:
        """int32 [B, max_pages] from explicit page lists (padding -1), for workers that don't own the allocator."""
        width = max(len(r) for r in rows)
        # through pinned memory: a pageable copy would wait for the step the prefill worker has in flight
        return to_device([r + [-1] * (width - len(r)) for r in rows], torch.int32, self.device)

    def build_metadata(
        self, chunks: list[list[int]], starts: list[int], page_table: Tensor, sample_rows: list[int],
        prev_tokens: Tensor | None = None,
    ) -> tuple[Tensor, AttentionMetadata]:
        """chunks[i]: new token ids of request i, whose first sits at position starts[i]; page_table row i
        holds its pages (at least up to starts[i] + len(chunks[i])). A negative id -1 - j is a placeholder for
        the token sampled in row j of the step before (still on the device: `prev_tokens`)."""
        dev, ps = self.device, self.page_size
        num_new = [len(c) for c in chunks]
        ids = [t for c in chunks for t in c]
        positions = [p for s, n in zip(starts, num_new) for p in range(s, s + n)]
        cu = [0]
        for n in num_new:
            cu.append(cu[-1] + n)
        seq_lens = [s + n for s, n in zip(starts, num_new)]
        page_table = page_table[:, : -(-max(seq_lens) // ps)].contiguous()
        num_decode = next((i for i, n in enumerate(num_new) if n != 1), len(num_new))
        split = 0 < num_decode < len(num_new)  # a mixed step: decode rows first (the scheduler's order)
        prefill_cu = [c - num_decode for c in cu[num_decode:]] if split else []
        # one host -> device copy for every per-token and per-request list
        input_ids, pos, lens, cu_t, logits_indices, num_new_t, prefill_cu_t = to_device_parts(
            [ids, positions, seq_lens, cu, [cu[i + 1] - 1 for i in sample_rows], num_new, prefill_cu], torch.long,
            dev)
        input_ids = fill_placeholders(input_ids, prev_tokens) if min(ids) < 0 else input_ids
        tok_req = torch.repeat_interleave(  # output_size: no device -> host sync to learn the length
            torch.arange(len(chunks), device=dev), num_new_t, output_size=len(ids)
        )
        slot_mapping = page_table[tok_req, pos // ps].long() * ps + pos % ps
        meta = AttentionMetadata(
            positions=pos,
            slot_mapping=slot_mapping,
            page_table=page_table,
            seq_lens=lens.int(),
            cu_seqlens_q=cu_t.int(),
            logits_indices=logits_indices,
            is_decode=num_decode == len(num_new),
            kv_pool=self.kv_pool,
            cos_sin_cache=self.cos_sin_cache,
            num_decode=num_decode if split else 0,
            prefill_cu_seqlens_q=prefill_cu_t.int() if split else None,
        )
        return input_ids, meta

    @torch.inference_mode()
    def forward(
        self, chunks: list[list[int]], starts: list[int], page_table: Tensor, sample_rows: list[int],
        prev_tokens: Tensor | None = None,
    ) -> Tensor:
        """float32 logits [len(sample_rows), vocab] for the last new token of each request in sample_rows.
        Placeholder ids (see `build_metadata`) are read from `prev_tokens` on the device."""
        g = self.graphs
        if (g is not None and len(chunks) <= g.max_bs and sample_rows == list(range(len(chunks)))
                and all(len(c) == 1 for c in chunks)):
            return g.run([c[0] for c in chunks], starts, page_table, prev_tokens)
        input_ids, meta = self.build_metadata(chunks, starts, page_table, sample_rows, prev_tokens)
        return self.model(input_ids, meta)

    @torch.inference_mode()
    def warm_up(self, max_tokens: int, max_batch: int, sample: Callable[..., object] | None = None) -> float:
        """Run the non-graph shapes serving will hit before the first request does: Triton compiles a kernel per
        specialisation (block sizes, batch-size buckets, ints divisible by 16 or not), 0.3-2 s each, which
        would otherwise land in some request's TTFT. Writes no KV (every slot -1) and reads page 0 only, so it
        is safe while other workers use the pool. `sample(logits, params, steps)` warms the sampler too. CUDA
        only (nothing is compiled on CPU). Returns seconds."""
        if self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        shapes: list[list[int]] = [[max_tokens], [max(1, max_tokens - 1)]]
        if max_tokens > 4096:
            shapes.append([4095])  # the prefill kernel's smaller-block variant
        chunk = min(64, max_tokens)
        for bsz in (2, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257):
            if bsz <= max_batch + 1:
                # a mixed step as the scheduler orders it (decode rows first: the decode kernel takes them), a
                # prefill batch of bsz prompts within the token budget (the prefill kernel's batch-size
                # buckets), an eager decode step
                shapes += [[1] * (bsz - 1) + [chunk], [max(1, min(chunk, max_tokens // bsz))] * bsz, [1] * bsz]
        greedy = CoreSampling(temperature=0.0)
        for lens in shapes:
            starts = [16 * (i % 4) for i in range(len(lens))]
            width = -(-(max(s + n for s, n in zip(starts, lens))) // self.page_size)
            table = torch.zeros((len(lens), width), dtype=torch.int32, device=self.device)
            ids, meta = self.build_metadata([[0] * n for n in lens], starts, table, list(range(len(lens))))
            meta.slot_mapping.fill_(-1)
            logits = self.model(ids, meta)
            if sample is not None:
                sample(logits, [greedy] * len(lens), [0] * len(lens))
        # the penalty kernel, whose one specialisation serves every batch (sampler.py runs it only for batches
        # that use penalties: compiled here, not in the first such request's step)
        vocab = self.model.config.vocab_size
        one = torch.ones(1, device=self.device)
        ops.apply_penalties(torch.zeros((1, vocab), device=self.device),
                            torch.zeros((1, vocab), dtype=torch.int32, device=self.device),
                            torch.zeros(1, dtype=torch.long, device=self.device), one, one, one)
        # and the grammar mask kernel's (structured output), on float32 logits as the sampler gives it
        ops.apply_token_bitmask(torch.zeros((1, vocab), device=self.device),
                                torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32, device=self.device),
                                torch.zeros(1, dtype=torch.long, device=self.device))
        torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - t0
