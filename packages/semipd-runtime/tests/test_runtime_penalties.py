"""Penalties, logit_bias and min_tokens in the engine core (CPU, random model): greedy tokens equal a plain
reference loop (transformers logits, penalties applied by their definition, argmax) in every serving path that
samples (unified with and without overlap, the CUDA-graph input path, semi-PD's prefill worker for first tokens,
preemption that rebuilds a request's counts); seeded sampling gives the same tokens across those paths; the
device-side counts track placeholders of the step in flight."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime_fixtures import prompts_fixture, random_model_fixture  # noqa: E402
from test_runtime_overlap import make_core, run  # noqa: E402

from semipd_kernels.reference import PROMPT_BIT  # noqa: E402
from semipd_runtime.messages import CoreSampling  # noqa: E402
from semipd_runtime.models.llama import LlamaForCausalLM  # noqa: E402
from semipd_runtime.penalties import PenaltyPlan, PenaltyRows, plan_fresh  # noqa: E402
from semipd_runtime.request import Request  # noqa: E402
from semipd_runtime.sampler import Sampler  # noqa: E402

N = 14
model_dir = random_model_fixture("llama-penalties", seed=3)
prompts = prompts_fixture(8, (5, 23, 9, 40, 2, 17, 30, 11))


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval().float()


def reference(hf: Any, prompt: list[int], s: CoreSampling, eos: set[int]) -> tuple[list[int], str]:
    """Greedy decoding by the definitions: logit_bias, the min_tokens ban, then repetition (prompt and output
    tokens), frequency and presence (output tokens), then argmax."""
    out: list[int] = []
    while True:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().tolist()
        for t, v in s.logit_bias.items():
            logits[t] += v
        stops = set(s.stop_token_ids) | (set() if s.ignore_eos else eos)
        if len(out) < s.min_tokens:
            for t in stops:
                logits[t] = float("-inf")
        counts, seen = Counter(out), set(prompt) | set(out)
        for t in seen:
            x = logits[t]
            x = x / s.repetition_penalty if x > 0 else x * s.repetition_penalty
            logits[t] = x - s.frequency_penalty * counts[t] - (s.presence_penalty if counts[t] else 0.0)
        tok = max(range(len(logits)), key=lambda i: (logits[i], -i))
        out.append(tok)
        if tok in stops:
            return out, "stop"
        if len(out) == s.max_tokens:
            return out, "length"


def greedy(**kw: Any) -> CoreSampling:
    return CoreSampling(temperature=0.0, max_tokens=N, ignore_eos=True, **kw)


def requests(hf: Any, prompts: list[list[int]]) -> tuple[list[tuple[str, list[int], CoreSampling]], int]:
    """One request per kind (and one without anything: a mixed batch); the EOS id is the plain greedy first
    token of prompt 4, so that min_tokens has an EOS to hold back."""
    plain = [reference(hf, p, greedy(), set())[0] for p in prompts]
    eos = plain[4][0]
    kinds = [
        greedy(repetition_penalty=1.6),
        greedy(presence_penalty=1.5, frequency_penalty=0.7),
        greedy(frequency_penalty=-1.0, repetition_penalty=0.8),  # negative: repeating is rewarded
        greedy(logit_bias={plain[3][0]: -100.0, plain[3][1]: -100.0, 7: 3.5}),
        CoreSampling(temperature=0.0, max_tokens=N, min_tokens=6, ignore_eos=False),
        greedy(),
        CoreSampling(temperature=0.0, max_tokens=N, min_tokens=3, stop_token_ids=[plain[6][1]],
                     presence_penalty=-0.5, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={9: 2.0}),
        greedy(repetition_penalty=1.3, logit_bias={plain[7][2]: 100.0}),
    ]
    return [(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, kinds))], eos


@pytest.fixture(scope="module")
def expected(hf: Any, prompts: list[list[int]]) -> tuple[list[tuple[str, list[int], CoreSampling]], int,
                                                         dict[str, tuple[list[int], str]]]:
    reqs, eos = requests(hf, prompts)
    want = {rid: reference(hf, p, s, {eos}) for rid, p, s in reqs}
    # each setting changes the output, so a path that drops one fails
    for rid, p, _ in reqs:
        if rid != "r5":
            assert want[rid][0] != reference(hf, p, greedy(), {eos})[0], rid
    assert eos not in want["r4"][0][:6] and len(want["r4"][0]) > 6  # EOS held back (without: [eos], "stop")
    assert set(want["r7"][0]) == set(reqs[7][2].logit_bias)  # +100 forces its token, even when repeated
    return reqs, eos, want


@pytest.mark.parametrize("mode,overlap,graphs", [("unified", False, False), ("unified", True, True),
                                                 ("semi-pd", True, False)])
def test_greedy_equals_reference_loop(model_dir: Path, model: LlamaForCausalLM, expected: Any, mode: str,
                                      overlap: bool, graphs: bool) -> None:
    reqs, eos, want = expected
    got = run(make_core(model_dir, model, mode, overlap=overlap, graphs=graphs, eos=[eos]), reqs)
    assert {rid: (got.tokens[rid], got.reasons[rid]) for rid in got.tokens} == want


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_preemption_rebuilds_counts(model_dir: Path, model: LlamaForCausalLM, expected: Any, mode: str) -> None:
    reqs, eos, want = expected
    # 24 pages of 4 tokens cannot hold every request at once: requests are preempted, resumed (semi-PD: the
    # prefill worker samples their next token) and their counts rebuilt from their tokens
    tight = dict(num_pages=24, max_running_requests=8, chunked_prefill_size=64)
    got = run(make_core(model_dir, model, mode, overlap=True, eos=[eos], **tight), reqs)
    assert sum(r.num_preemptions for r in got.requests) > 0
    assert {rid: (got.tokens[rid], got.reasons[rid]) for rid in got.tokens} == want


def test_seeded_sampling_same_in_every_path(model_dir: Path, model: LlamaForCausalLM,
                                            prompts: list[list[int]]) -> None:
    def s(i: int) -> CoreSampling:
        return CoreSampling(temperature=0.9, top_p=0.95, seed=40 + i, max_tokens=N, ignore_eos=True,
                            presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.1 + i / 20)

    reqs = [(f"r{i}", p, s(i)) for i, p in enumerate(prompts)]
    want = run(make_core(model_dir, model, "unified", overlap=False), reqs).tokens
    plain = run(make_core(model_dir, model, "unified", overlap=False),
                [(rid, p, CoreSampling(temperature=0.9, top_p=0.95, seed=x.seed, max_tokens=N, ignore_eos=True))
                 for rid, p, x in reqs]).tokens
    assert want != plain
    for mode, graphs in (("unified", True), ("semi-pd", False)):
        assert run(make_core(model_dir, model, mode, overlap=True, graphs=graphs), reqs).tokens == want, mode


def test_counts_follow_placeholders_of_the_step_in_flight() -> None:
    """A row rebuilt while its newest output is a placeholder reads that token from the previous call's
    tokens on the device; each call then adds its own token."""
    sampler = Sampler()
    logits = torch.zeros(2, 10)
    logits[0, 4] = logits[1, 6] = 5.0
    s = CoreSampling(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0)
    assert sampler(logits, [CoreSampling(temperature=0.0)] * 2, [0, 0])[0] == [4, 6]  # no plan: no state
    assert sampler.penalties.counts is None
    plan = PenaltyPlan(rows=[3], presence=[0.0], frequency=[1.0], repetition=[2.0], init_rows=[3],
                       prompt_rows=[3, 3], prompt_ids=[1, 4], output_rows=[3, 3], output_ids=[4, -2])
    tokens, _ = sampler(logits[1:], [s], [2], plan)  # outputs [4, <row 1 of the previous call: 6>]
    counts = sampler.penalties.counts
    assert counts is not None and counts.shape[0] == 16
    want = {1: PROMPT_BIT, 4: PROMPT_BIT | 1, 6: 1 + (tokens[0] == 6)}
    assert {t: int(c) for t, c in enumerate(counts[3]) if c} == {t: c for t, c in want.items() if c}
    # the same request's next step: nothing rebuilt, its token is added
    again = PenaltyPlan(rows=[3], presence=[0.0], frequency=[1.0], repetition=[2.0])
    before = counts[3].clone()
    tok2, _ = sampler(logits[1:], [s], [3], again)
    assert int(sampler.penalties.counts[3, tok2[0]]) == int(before[tok2[0]]) + 1  # type: ignore[index]


def test_prefill_plan_splits_prompt_and_outputs() -> None:
    s = CoreSampling(repetition_penalty=1.5, min_tokens=2, stop_token_ids=[8], logit_bias={3: -1.0})
    plan = plan_fresh([s, CoreSampling(), s], [([1, 2], [5]), ([7], []), ([4], [])], eos=[0])
    assert plan is not None
    assert plan.rows == [0, -1, 1] and plan.init_rows == [0, 1]
    assert (plan.prompt_rows, plan.prompt_ids, plan.output_rows, plan.output_ids) == ([0, 0, 1], [1, 2, 4], [0], [5])
    bias = sorted(zip(plan.bias_index, plan.bias_ids, plan.bias_values))
    inf = float("-inf")
    assert bias == [(0, 0, inf), (0, 3, -1.0), (0, 8, inf), (2, 0, inf), (2, 3, -1.0), (2, 8, inf)]
    assert plan_fresh([CoreSampling()] * 2, [([1], []), ([2], [3])], eos=[0]) is None  # nothing to do


def test_rows_are_trusted_only_with_every_output_counted() -> None:
    rows = PenaltyRows(eos={0})
    s = CoreSampling(frequency_penalty=0.5)
    a = Request("a", [5, 6], s, output_ids=[9], slot=2)
    first = rows.plan([a])
    assert first is not None and first.rows == [2] and first.init_rows == [2] and first.output_ids == [9]
    a.output_ids.append(-1)  # sampled by that call (a placeholder until it resolves)
    assert rows.plan([a]).init_rows == []  # type: ignore[union-attr]
    a.output_ids += [11, 12]  # a token this core did not sample (a prefill worker resumed it elsewhere)
    assert rows.plan([a]).init_rows == [2]  # type: ignore[union-attr]
    b = Request("a", [5, 6], s, output_ids=list(a.output_ids) + [-1], slot=2)  # same rid, another request
    assert rows.plan([b]).init_rows == [2]  # type: ignore[union-attr]
    a.slot = 3  # preempted, back in another slot
    assert rows.plan([a]).init_rows == [3]  # type: ignore[union-attr]
    assert rows.plan([Request("c", [1], CoreSampling(), slot=0)]) is None
