"""Turn logits into next tokens (+ logprobs) for a batch with per-row sampling parameters.

`sample` only queues work: the tokens stay on the device (the next step can read them there) and a copy to
host memory is started; `SampledTokens.read` waits for that copy alone. Logprobs are computed at launch too,
since the logits may live in a static buffer the next step overwrites (CUDA graphs).

Before sampling, the logits go through the batch's `PenaltyPlan` (logit_bias, min_tokens, penalties), when
there is one, then the grammar rows' `TokenBitmask`; logprobs are those of the model's own distribution, before
the plan (vLLM's default) but after the grammar mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from semipd_kernels import ops
from semipd_runtime.forward_batch import to_device, to_device_parts
from semipd_runtime.grammar import TokenBitmask
from semipd_runtime.messages import CoreSampling, TokenLogprobMsg
from semipd_runtime.penalties import PenaltyPlan, PenaltyState


def _to_host(t: Tensor) -> Tensor:
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


@dataclass(slots=True)
class SampledTokens:
    tokens: Tensor  # int64 [S] on the device
    host: Tensor  # its host copy (in flight on CUDA until `ready`)
    params: list[CoreSampling]
    want: list[int]  # rows that asked for logprobs
    lp_host: tuple[Tensor, Tensor, Tensor] | None  # chosen [W], top values [W, k], top ids [W, k]
    ready: torch.cuda.Event | None  # recorded after the host copies (None on CPU: nothing to wait for)

    def read(self) -> tuple[list[int], list[TokenLogprobMsg | None]]:
        """Wait for the host copies (this stream's work up to them, nothing else) and unpack."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.host.tolist()
        out: list[TokenLogprobMsg | None] = [None] * len(self.params)
        if self.lp_host is not None:
            chosen, top_v, top_i = (t.tolist() for t in self.lp_host)
            for j, i in enumerate(self.want):
                n = self.params[i].logprobs or 0
                out[i] = TokenLogprobMsg(tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return tokens, out


class Sampler:
    def __init__(self) -> None:
        self.penalties = PenaltyState()
        self.last_tokens: Tensor | None = None  # of the previous call: placeholders in a plan refer to them

    def __call__(
        self, logits: Tensor, params: list[CoreSampling], steps: list[int], plan: PenaltyPlan | None = None,
        bitmask: TokenBitmask | None = None,
    ) -> tuple[list[int], list[TokenLogprobMsg | None]]:
        return self.sample(logits, params, steps, plan, bitmask).read()

    def sample(self, logits: Tensor, params: list[CoreSampling], steps: list[int],
               plan: PenaltyPlan | None = None, bitmask: TokenBitmask | None = None) -> SampledTokens:
        """steps[i]: row i's sampling step (its output tokens so far: the RNG stream position). plan: from
        `penalties.plan_penalties` for these rows (None: no row uses penalties, bias or min_tokens). bitmask:
        grammar rows' allowed tokens, applied last before sampling (after the plan, so no bias can bring a
        banned token back) and to the model's logits too, so logprobs are of the constrained distribution
        (as vLLM reports them)."""
        dev = logits.device
        f = to_device_parts([[p.temperature for p in params], [p.top_p for p in params],
                             [p.min_p for p in params]], torch.float32, dev)
        i = to_device_parts([[p.top_k for p in params], [p.seed for p in params], steps], torch.int64, dev)
        processed, counted = logits, None
        if plan is not None:
            processed, counted = self.penalties.apply(logits, plan, self.last_tokens)
        if bitmask is not None:
            bitmask.apply(processed)  # in place: without a plan, processed is the model's logits
            if processed is not logits and any(p.logprobs is not None for p in params):
                bitmask.apply(logits)
        tokens = ops.sample(processed, f[0], i[0].int(), f[1], f[2], i[1], i[2])
        if counted is not None:
            self.penalties.count(counted, tokens)
        self.last_tokens = tokens
        want = [j for j, p in enumerate(params) if p.logprobs is not None]
        lp = self._logprobs(logits, tokens, params, want) if want else None
        host = _to_host(tokens)
        lp_host = None if lp is None else (_to_host(lp[0]), _to_host(lp[1]), _to_host(lp[2]))
        ready = None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return SampledTokens(tokens, host, params, want, lp_host, ready)

    @staticmethod
    def _logprobs(
        logits: Tensor, tokens: Tensor, params: list[CoreSampling], want: list[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        # logprobs of the model's own distribution (before temperature / filtering), as OpenAI and vLLM report
        rows = to_device(want, torch.long, logits.device)
        lp = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1)
        k = max(params[i].logprobs or 0 for i in want)
        top_v, top_i = (lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long()))
        return chosen, top_v, top_i
