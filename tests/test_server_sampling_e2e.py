"""Penalties, logit_bias, min_tokens and include_stop_str_in_output through the real `semipd-server` (default
model, engine core in its own process), driven by the official `openai` client; the native /generate takes
SGLang's names and gives the token ids the exact checks need."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from semipd_server.testing import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
# greedy continuations the default model repeats itself in (" hello hello ...", "The cat sat on the mat.")
REPEATS = ["hello hello hello hello hello hello", "The cat sat on the mat. The cat sat on the mat. The cat"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess("--num-pages", "512", "--max-running-requests", "16", "--chunked-prefill-size", "256",
                        log_path=tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def tokens(client: openai.OpenAI, prompt: str, max_tokens: int = 32, **kw: Any) -> list[str]:
    """The completion's tokens (as strings), greedy unless kw says otherwise."""
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, logprobs=0,
                                    **{"temperature": 0.0, **kw})
    assert out.choices[0].logprobs is not None
    return list(out.choices[0].logprobs.tokens or [])


def generate_ids(server: ServerProcess, text: str, **sampling: Any) -> list[int]:
    body = {"text": text, "sampling_params": {"temperature": 0.0, **sampling}}
    r = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ids: list[int] = r.json()["output_ids"]
    return ids


def repeats(toks: list[Any]) -> int:
    return len(toks) - len(set(toks))


def batch_repeats(client: openai.OpenAI, **kw: Any) -> int:
    """Repeated tokens summed over REPEATS, sent as one batched greedy request (the prompts decode together)."""
    out = client.completions.create(model=MODEL, prompt=REPEATS, max_tokens=32, logprobs=0,
                                    **{"temperature": 0.0, **kw})
    return sum(repeats(c.logprobs.tokens or []) for c in out.choices if c.logprobs is not None)


def test_penalties_reduce_repeated_tokens(client: openai.OpenAI) -> None:
    base = batch_repeats(client, extra_body={"ignore_eos": True})
    assert base >= 20  # the model really repeats itself here
    for kw in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.5},
               {"extra_body": {"repetition_penalty": 1.5, "ignore_eos": True}}):
        kw.setdefault("extra_body", {"ignore_eos": True})
        got = batch_repeats(client, **kw)
        assert got < base * 0.7, (kw, got, base)
    # sampled on a fixed seed: the same, summed over n completions
    seeded = dict(temperature=0.8, seed=1234, n=4, max_tokens=32)

    def sampled_repeats(**kw: Any) -> int:
        out = client.completions.create(model=MODEL, prompt=REPEATS[0], logprobs=0, extra_body={"ignore_eos": True},
                                        **{**seeded, **kw})
        return sum(repeats(c.logprobs.tokens or []) for c in out.choices if c.logprobs is not None)

    plain = sampled_repeats()
    assert sampled_repeats() == plain  # the seed fixes the draw
    assert sampled_repeats(frequency_penalty=1.2) < plain * 0.7


def test_logit_bias_bans_and_forces_a_token(server: ServerProcess, client: openai.OpenAI) -> None:
    prompt = REPEATS[0]
    ids = generate_ids(server, prompt, max_new_tokens=24, ignore_eos=True)
    banned = ids[0]  # the greedy token, and the one it keeps repeating
    assert ids.count(banned) >= 5
    base = tokens(client, prompt, 24, extra_body={"ignore_eos": True})
    got = tokens(client, prompt, 24, logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    assert base[0] not in got and got != base
    assert banned not in generate_ids(server, prompt, max_new_tokens=24, ignore_eos=True,
                                      logit_bias={str(banned): -100})
    forced = generate_ids(server, "The capital of France is", max_new_tokens=1)[0]
    assert forced != banned
    assert generate_ids(server, prompt, max_new_tokens=8, ignore_eos=True,
                        logit_bias={str(forced): 100}) == [forced] * 8
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0.0, logit_bias={str(forced): 100},
                                          logprobs=True)
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert len({t.token for t in chat.choices[0].logprobs.content}) == 1


def test_min_tokens_keeps_going_past_eos_and_stop_strings(client: openai.OpenAI) -> None:
    msgs: Any = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    base = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=30, temperature=0.0)
    assert base.choices[0].finish_reason == "stop" and base.usage is not None
    assert base.usage.completion_tokens < 8  # ends at EOS early
    longer = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=30, temperature=0.0,
                                            extra_body={"min_tokens": 12})
    assert longer.usage is not None and longer.usage.completion_tokens >= 12
    # a stop string matched before min_tokens does not end the completion
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24,
                                     temperature=0.0).choices[0].text
    stop = text.split()[1]  # a word among the first few tokens
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0.0,
                                    stop=[stop])
    held = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0.0,
                                     stop=[stop], extra_body={"min_tokens": 16})
    assert cut.usage is not None and held.usage is not None
    assert cut.usage.completion_tokens < 8 <= 16 <= held.usage.completion_tokens
    assert text.startswith(held.choices[0].text) and len(held.choices[0].text) > len(cut.choices[0].text)


def test_include_stop_str_in_output(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0).choices[0].text
    stop = " " + text.split()[3]
    at = text.index(stop)

    def complete(stream: bool, **extra: Any) -> str:
        kw: Any = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0, stop=[stop], extra_body=extra)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        out = client.completions.create(**kw).choices[0]
        assert out.finish_reason == "stop"
        return out.text

    assert complete(False) == complete(True) == text[:at]
    kept = text[: at + len(stop)]
    assert complete(False, include_stop_str_in_output=True) == complete(True, include_stop_str_in_output=True) == kept


@pytest.mark.parametrize("kw,param", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(logit_bias={"99999999": 1}), "logit_bias"),  # outside the vocabulary
    (dict(logit_bias={"5": 150}), "logit_bias"),
    (dict(logit_bias={"five": 1}), "logit_bias"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens"),  # above max_tokens
])
def test_bad_values_are_400_naming_the_field(client: openai.OpenAI, kw: dict[str, Any], param: str) -> None:
    for create in (lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=8, **kw),
                   lambda: client.chat.completions.create(model=MODEL, max_tokens=8, **kw,
                                                          messages=[{"role": "user", "content": "x"}])):
        with pytest.raises(openai.BadRequestError) as info:
            create()
        assert info.value.status_code == 400 and info.value.body["param"] == param  # type: ignore[index]


def test_native_names_are_checked(server: ServerProcess) -> None:
    for sampling, param in (({"max_new_tokens": 4, "min_new_tokens": 5}, "sampling_params.min_new_tokens"),
                            ({"presence_penalty": -2.5}, "sampling_params.presence_penalty")):
        r = httpx.post(f"{server.url}/generate", json={"text": "x", "sampling_params": sampling}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # SGLang's min_new_tokens holds EOS back
    chat = "<|im_start|>user\nIs the sky blue? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n"
    assert len(generate_ids(server, chat, max_new_tokens=20)) < 8
    assert len(generate_ids(server, chat, max_new_tokens=20, min_new_tokens=15)) >= 15
