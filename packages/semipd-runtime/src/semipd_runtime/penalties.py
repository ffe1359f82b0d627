"""Penalties, logit_bias and min_tokens: what the sampler does to a batch's logits before temperature, top-k and
top-p, on the device and over the whole batch at once.

Three parts:
  `PenaltyPlan`  host lists for one sampling call (plain data: a tensor-parallel rank gets the same plan);
  `PenaltyState` the device side: one packed int32 row of token counts per request (output counts, plus a prompt
                 bit for repetition_penalty; `semipd_kernels.reference.PROMPT_BIT`), rebuilt from the token lists
                 when a request takes its row, then kept up to date by adding each step's sampled tokens on the
                 device (no host sync, and the step in flight's tokens count before the host has read them);
  `PenaltyRows`  the engine core's bookkeeping of which request each row holds (a row is the request's page slot).

Order, as vLLM: logit_bias and the min_tokens ban (-inf on EOS and stop_token_ids) are added first, then the
repetition penalty (prompt and output tokens), then the frequency and presence penalties (output tokens). A batch
whose requests use none of them gets no plan and pays nothing."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from semipd_kernels import ops
from semipd_kernels.reference import PROMPT_BIT
from semipd_runtime.forward_batch import fill_placeholders, to_device_parts
from semipd_runtime.messages import CoreSampling
from semipd_runtime.request import Request


def has_penalties(s: CoreSampling) -> bool:
    """Whether s needs a row of token counts (the dense penalties)."""
    return s.presence_penalty != 0.0 or s.frequency_penalty != 0.0 or s.repetition_penalty != 1.0


def needs_plan(s: CoreSampling) -> bool:
    return bool(s.logit_bias) or s.min_tokens > 0 or has_penalties(s)


@dataclass(slots=True)
class PenaltyPlan:
    """The logits processing of one sampling call, by sampled row b."""

    rows: list[int] = field(default_factory=list)  # b -> its row of token counts (-1: no dense penalty)
    presence: list[float] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    # rows rebuilt before use: zeroed, then the prompt bit of each (row, prompt id), then +1 per (row, output id);
    # a negative output id is a placeholder for a token of the sampler's previous call (`fill_placeholders`)
    init_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    output_rows: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    # sparse additions to the logits: logit_bias, and -inf for tokens min_tokens bans
    bias_index: list[int] = field(default_factory=list)  # b
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)

    @property
    def dense(self) -> bool:
        return any(r >= 0 for r in self.rows)


# row_of(b) -> (row, (prompt ids, output ids) when the row must be rebuilt from them, else None)
RowOf = Callable[[int], tuple[int, tuple[Sequence[int], Sequence[int]] | None]]


def plan_penalties(samplings: Sequence[CoreSampling], num_out: Sequence[int], eos: Collection[int],
                   row_of: RowOf) -> PenaltyPlan | None:
    """The plan for sampling the (num_out[b] + 1)-th output token of each row b; None when no row needs one.
    eos: the ids min_tokens bans besides each request's stop_token_ids (unless it ignores EOS)."""
    if not any(needs_plan(s) for s in samplings):
        return None
    plan = PenaltyPlan()
    for b, (s, n) in enumerate(zip(samplings, num_out)):
        row = -1
        if has_penalties(s):
            row, history = row_of(b)
            if history is not None:
                prompt, outputs = history
                plan.init_rows.append(row)
                plan.prompt_rows += [row] * len(prompt)
                plan.prompt_ids += prompt
                plan.output_rows += [row] * len(outputs)
                plan.output_ids += outputs
        plan.rows.append(row)
        plan.presence.append(s.presence_penalty)
        plan.frequency.append(s.frequency_penalty)
        plan.repetition.append(s.repetition_penalty)
        bias = dict(s.logit_bias)
        if n < s.min_tokens:
            for t in set(s.stop_token_ids) | (set() if s.ignore_eos else set(eos)):
                bias[t] = float("-inf")
        plan.bias_index += [b] * len(bias)
        plan.bias_ids += bias
        plan.bias_values += bias.values()
    return plan


class PenaltyState:
    """The device side of the plans of one sampler: token counts [rows, vocab], allocated on first use and grown
    when a larger row comes (4 bytes per token per row: 64 rows of a 128k vocab take 32 MiB)."""

    def __init__(self) -> None:
        self.counts: Tensor | None = None

    def _counts(self, num_rows: int, vocab: int, device: torch.device) -> Tensor:
        c = self.counts
        if c is None or c.shape[0] < num_rows or c.shape[1] != vocab or c.device != device:
            grown = torch.zeros((-(-num_rows // 16) * 16, vocab), dtype=torch.int32, device=device)
            if c is not None and c.shape[1] == vocab and c.device == device:
                grown[: c.shape[0]].copy_(c)  # rows in use keep their counts
                if c.is_cuda:  # allocated on an earlier stream maybe (a retired SM split): freed after this one
                    c.record_stream(torch.cuda.current_stream(device))
            self.counts = c = grown
        return c

    def apply(self, logits: Tensor, plan: PenaltyPlan, prev_tokens: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The processed logits (a new tensor: the caller's stay as they were, e.g. for logprobs) and the
        [2, D] (b, row) pairs of the rows whose sampled token `count` must add. prev_tokens: the tokens of
        the sampler's previous call (for placeholders among the rebuilt rows' outputs)."""
        dev, vocab = logits.device, logits.shape[1]
        dense = [(b, r) for b, r in enumerate(plan.rows) if r >= 0]
        ints = to_device_parts([plan.rows, [b for b, _ in dense], [r for _, r in dense], plan.bias_index,
                                plan.bias_ids], torch.long, dev)
        floats = to_device_parts([plan.presence, plan.frequency, plan.repetition, plan.bias_values],
                                 torch.float32, dev)
        out = logits.float()
        if plan.bias_index:  # into a copy: the caller's logits stay the model's (logprobs)
            out = out.clone()
            out.view(-1).index_add_(0, ints[3] * vocab + ints[4], floats[3])
        if not dense:
            return out, None
        counts = self._counts(max(plan.rows) + 1, vocab, dev)
        if plan.init_rows:
            self._rebuild(counts, plan, prev_tokens)
        out = ops.apply_penalties(out, counts, ints[0], floats[0], floats[1], floats[2])
        return out, torch.stack([ints[1], ints[2]])

    def count(self, pairs: Tensor, tokens: Tensor) -> None:
        """Add the sampled tokens of the (b, row) pairs that `apply` returned."""
        c = self.counts
        assert c is not None
        flat = pairs[1] * c.shape[1] + tokens.index_select(0, pairs[0])
        c.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    @staticmethod
    def _rebuild(counts: Tensor, plan: PenaltyPlan, prev_tokens: Tensor | None) -> None:
        rows, p_rows, p_ids, o_rows, o_ids = to_device_parts(
            [plan.init_rows, plan.prompt_rows, plan.prompt_ids, plan.output_rows, plan.output_ids], torch.long,
            counts.device)
        vocab, flat = counts.shape[1], counts.view(-1)
        counts.index_fill_(0, rows, 0)
        if plan.prompt_ids:
            flat.index_fill_(0, p_rows * vocab + p_ids, PROMPT_BIT)  # repeated ids: the same bit, set again
        if plan.output_ids:
            if min(plan.output_ids) < 0:
                o_ids = fill_placeholders(o_ids, prev_tokens)
            flat.index_add_(0, o_rows * vocab + o_ids, torch.ones_like(o_ids, dtype=torch.int32))


class PenaltyRows:
    """The engine core's plans. A request's row of token counts is its page slot, held from admission to release.
    The row is trusted only while it holds the counts of every output token the request has (this core
    counted them); anything else rebuilds it from the token lists: a new request in the slot, a first token
    sampled by a prefill worker elsewhere, a preempted request back in another slot."""

    def __init__(self, eos: Collection[int]) -> None:
        self.eos = eos
        self.held: dict[int, tuple[Request, int]] = {}  # slot -> (request, output tokens counted in it)

    def plan(self, reqs: Sequence[Request]) -> PenaltyPlan | None:
        """The plan for sampling one token of each of reqs (their output_ids end before it)."""
        if not any(needs_plan(r.sampling) for r in reqs):
            return None  # the common case, checked before any list is built

        def row_of(b: int) -> tuple[int, tuple[Sequence[int], Sequence[int]] | None]:
            req = reqs[b]
            assert req.slot is not None
            n = len(req.output_ids)
            held = self.held.get(req.slot)
            self.held[req.slot] = (req, n + 1)  # the token sampled now is counted by this call
            if held is not None and held[0] is req and held[1] == n:
                return req.slot, None
            return req.slot, (req.prompt_ids, req.output_ids)

        return plan_penalties([r.sampling for r in reqs], [len(r.output_ids) for r in reqs], self.eos, row_of)


def plan_fresh(samplings: Sequence[CoreSampling], histories: Sequence[tuple[Sequence[int], Sequence[int]]],
               eos: Collection[int]) -> PenaltyPlan | None:
    """A plan whose rows are all built from scratch (0, 1, ...): a prefill worker's, which keeps no state
    between batches. histories[b]: (prompt ids, output ids) of row b."""
    next_row = iter(range(len(samplings)))
    return plan_penalties(samplings, [len(h[1]) for h in histories], eos,
                          lambda b: (next(next_row), histories[b]))
