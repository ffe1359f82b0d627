"""Turn logits into next tokens (+ logprobs) for a batch with per-row sampling parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from semipd_kernels import ops
from semipd_runtime.messages import CoreSampling, TokenLogprobMsg


class Sampler:
    def __call__(
        self, logits: Tensor, params: list[CoreSampling], steps: list[int]
    ) -> tuple[list[int], list[TokenLogprobMsg | None]]:
        dev = logits.device
        tokens = ops.sample(
            logits,
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in params], dtype=torch.int32, device=dev),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.seed for p in params], dtype=torch.int64, device=dev),
            torch.tensor(steps, dtype=torch.int64, device=dev),
        )
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return tokens.tolist(), [None] * len(params)
        return tokens.tolist(), self._logprobs(logits, tokens, params, want)

    @staticmethod
    def _logprobs(
        logits: Tensor, tokens: Tensor, params: list[CoreSampling], want: list[int]
    ) -> list[TokenLogprobMsg | None]:
        # logprobs of the model's own distribution (before temperature / filtering), as OpenAI and vLLM report
        rows = torch.tensor(want, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
        k = max(params[i].logprobs or 0 for i in want)
        top_v, top_i = (lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long()))
        top_v, top_i = top_v.tolist(), top_i.tolist()
        out: list[TokenLogprobMsg | None] = [None] * len(params)
        tok_list = tokens.tolist()
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            out[i] = TokenLogprobMsg(tok_list[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return out
