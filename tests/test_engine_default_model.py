"""End to end on the real default model (SmolLM2-135M-Instruct from the bundled GGUF), CPU fp32."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from semipd_runtime import Engine, EngineStats, SamplingParams
from semipd_runtime.errors import InvalidRequestError

pytestmark = pytest.mark.slow  # the real default model: converted, loaded and run end to end

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "Water boils at",
    "Translate to French: I like apples. ->",
    "Q: What is the largest planet in the solar system?\nA:",
    "A long prompt: " + " ".join(f"item{i}" for i in range(60)) + ". The last item was",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(max_running_requests=16, chunked_prefill_size=256, num_pages=256)
    yield eng
    eng.shutdown()


@pytest.fixture(autouse=True)
def pool_is_empty_after(engine: Engine) -> Iterator[None]:
    yield
    assert engine.refresh_stats().pages_used == 0


@pytest.fixture(scope="module")
def hf_model(engine: Engine):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from semipd_runtime.models.default_model import default_gguf_path

    gguf = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # we compare with ignore_eos: EOS is a token like any other
    return model


def test_greedy_batched_equals_transformers_gguf(engine: Engine, hf_model) -> None:  # type: ignore[no-untyped-def]
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    prompts = PROMPTS + [chat]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ids = out.prompt_token_ids
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    pad_token_id=0)
        assert out.token_ids == ref[0, len(ids):].tolist(), prompt
        assert out.finish_reason == "length"


def test_stats_are_a_struct_callers_cannot_change(engine: Engine) -> None:
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.pages_total == 256 and stats.healthy
    stats.pages_total, stats.healthy = 1, False
    assert engine.stats().pages_total == 256 and engine.stats().healthy  # a copy: the engine goes by its own
    assert engine.refresh_stats() == engine.stats() and engine.refresh_stats() is not engine.stats()


def test_seed_reproduces_sampling(engine: Engine) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    a = engine.generate(PROMPTS[:3], p)
    b = engine.generate(PROMPTS[:3], p)
    c = engine.generate(PROMPTS[:3], SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_stop_string_cuts_text(engine: Engine) -> None:
    base = engine.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    words = base.text.split()
    assert len(words) > 4
    stop = " " + words[3]
    cut = base.text.index(stop)
    out = engine.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop, "zzzz"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[:cut]
    assert out.outputs[0].stop_reason == stop


def test_n_and_logprobs(engine: Engine) -> None:
    out = engine.generate(PROMPTS[0], SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=8, logprobs=3,
                                                     ignore_eos=True))[0]
    assert len(out.outputs) == 3
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 8
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp.token_id == tok and lp.logprob <= 0.0
            assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
            top = dict(lp.top)
            assert abs(top[tok] - lp.logprob) < 1e-5 if tok in top else lp.logprob <= lp.top[-1][1] + 1e-6
    greedy = engine.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, logprobs=1))[0].outputs[0]
    assert greedy.logprobs is not None
    assert all(lp.top[0][0] == t for lp, t in zip(greedy.logprobs, greedy.token_ids))


def test_rejections_are_clear_and_change_nothing(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as e:
        engine.generate("x " * 9000, SamplingParams(max_tokens=4))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=0))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=6000))  # fits the context, not the 256-page pool
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        engine.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))
    assert e.value.param == "prompt"
    assert engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2))[0].finish_reason == "length"


def test_stream_and_abort(engine: Engine) -> None:
    async def run() -> tuple[str, list[str], str | None]:
        deltas: list[str] = []
        final = None
        async for o in engine.stream(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)):
            deltas.append(o.outputs[0].delta_text)
            final = o
        assert final is not None and final.finished
        # abort mid-stream: the stream ends with finish_reason "abort"
        reasons = []
        async for o in engine.stream(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True),
                                     request_id="to-abort"):
            if len(o.outputs[0].token_ids) >= 3 and not reasons:
                engine.abort("to-abort")
                reasons.append("sent")
            if o.finished:
                reasons.append(o.outputs[0].finish_reason or "")
        return final.outputs[0].text, deltas, reasons[-1]

    text, deltas, reason = asyncio.run(run())
    ref = engine.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].text
    assert "".join(deltas) == text == ref
    assert reason == "abort"


def test_process_core_matches_thread_core(engine: Engine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12)
    with Engine(core="process", num_pages=256) as proc_engine:
        got = [o.token_ids for o in proc_engine.generate(PROMPTS[:4], params)]
        assert proc_engine.refresh_stats().pages_used == 0
    assert got == [o.token_ids for o in engine.generate(PROMPTS[:4], params)]
