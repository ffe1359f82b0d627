"""The vLLM / SGLang surface on the real `semipd-server` (default model), through the `openai` client: the flag
spellings users type (--served-model-name with two names, --chat-template, --tokenizer-path, --seed, ...), the
routes (/v1/models/{id}, /version, /ping, /tokenize, /health_generate, ...), stop_reason (null at EOS, the token id
for stop_token_ids), metrics without `*_created` series, and the smg gateway still taking the server for SGLang
while it answers /version."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from semipd_runtime.models.default_model import default_model_path
from semipd_runtime.tokenizer import Tokenizer
from semipd_server.testing import ServerProcess, free_port

pytestmark = pytest.mark.slow
MODEL, ALIAS = "SmolLM2-135M-Instruct", "smol"
# ChatML like the model's own, without its default system prompt, plus a variable for chat_template_kwargs
TEMPLATE = ("{% if greeting %}{{ greeting }}\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--model", str(default_model_path()), "--tokenizer-path", str(default_model_path()),
        "--served-model-name", MODEL, ALIAS, "--chat-template", TEMPLATE, "--seed", "7",
        "--max-num-seqs", "8", "--max-model-len", "1024", "--num-pages", "256", "--max-num-batched-tokens", "256",
        "--log-level", "DEBUG", "--enable-metrics", "--trust-remote-code",
        log_path=tmp_path_factory.mktemp("api") / "server.log",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def v1(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def root(v1: openai.OpenAI, server: ServerProcess) -> openai.OpenAI:
    return v1.with_options(base_url=server.url)


def test_seed_makes_unseeded_sampling_reproducible(v1: openai.OpenAI) -> None:
    """--seed 7: requests that send no seed draw theirs from random.Random(7), so a run repeats itself. First in
    this module: the server's first request takes the first draw."""
    draws = random.Random(7)
    kw: Any = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0)
    unseeded = v1.completions.create(**kw).choices[0].text
    seeded = [v1.completions.create(**kw, seed=draws.getrandbits(62)).choices[0].text for _ in range(2)]
    assert seeded[0] == unseeded != seeded[1]


def test_models_and_info_routes(v1: openai.OpenAI, root: openai.OpenAI) -> None:
    assert [m.id for m in v1.models.list().data] == [MODEL, ALIAS]
    card = v1.models.retrieve(ALIAS)
    assert (card.id, card.owned_by, card.max_model_len) == (ALIAS, "sglang", 1024)  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        v1.models.retrieve("gpt-4")
    version: Any = root.get("/version", cast_to=object)
    info: Any = root.get("/server_info", cast_to=object)
    assert info["version"] == version["version"] and info["max_running_requests"] == 8  # --max-num-seqs
    assert info["context_length"] == 1024 and info["served_model_names"] == [MODEL, ALIAS]
    model_info: Any = root.get("/get_model_info", cast_to=object)
    assert model_info["is_generation"] and model_info["context_length"] == 1024
    for path in ("/ping", "/health", "/health_generate"):
        assert root.get(path, cast_to=httpx.Response).status_code == 200, path


def test_alias_and_chat_template_with_kwargs(v1: openai.OpenAI, root: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Say OK."}]
    plain: Any = root.post("/v1/tokenize", body={"model": ALIAS, "messages": messages}, cast_to=object)
    greeted: Any = root.post("/tokenize", body={"model": ALIAS, "messages": messages,
                                                "chat_template_kwargs": {"greeting": "Bonjour"}}, cast_to=object)
    text: Any = root.post("/detokenize", body={"tokens": greeted["tokens"]}, cast_to=object)
    assert text["prompt"].startswith("Bonjour\n<|im_start|>user\nSay OK.<|im_end|>")  # --chat-template in use
    assert greeted["count"] > plain["count"] and greeted["max_model_len"] == 1024
    r = v1.chat.completions.create(model=ALIAS, messages=messages, max_tokens=2, temperature=0,
                                   extra_body={"chat_template_kwargs": {"greeting": "Bonjour"}})
    assert r.usage and r.usage.prompt_tokens == greeted["count"] and r.model == MODEL


def test_stop_reason(v1: openai.OpenAI, root: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    ref = v1.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    ids: Any = root.post("/tokenize", body={"prompt": prompt + ref.choices[0].text}, cast_to=object)
    second = ids["tokens"][-2]  # the second generated token
    r = v1.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                              extra_body={"stop_token_ids": [second]})
    assert (r.choices[0].finish_reason, r.choices[0].stop_reason) == ("stop", second)  # type: ignore[attr-defined]
    r = v1.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[" is"])
    assert r.choices[0].finish_reason in ("stop", "length")
    # a chat reply that ends at EOS: stop_reason null, as vLLM reports it, even with EOS among stop_token_ids
    msgs: Any = [{"role": "user", "content": "Say OK."}]
    eos = Tokenizer.from_dir(default_model_path()).eos_token_ids
    for extra in ({}, {"stop_token_ids": eos}):
        chat = v1.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0, extra_body=extra)
        assert chat.choices[0].finish_reason == "stop" and chat.choices[0].stop_reason is None  # type: ignore[attr-defined]
    gen: Any = root.post("/generate", body={"text": "The capital of France is", "sampling_params":
                                            {"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [second]}},
                         cast_to=object)
    assert gen["meta_info"]["finish_reason"] == {"type": "stop", "matched": second}


def test_extension_fields_and_debug_log(v1: openai.OpenAI, server: ServerProcess) -> None:
    extra = {"user": "u-e2e", "service_tier": "auto", "separate_reasoning": False, "bootstrap_room": 3,
             "spaces_between_special_tokens": False, "skip_special_tokens": True}
    msgs: Any = [{"role": "user", "content": "Say OK."}]
    base = v1.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    r = v1.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, extra_body=extra)
    assert r.choices[0].message.content == base.choices[0].message.content
    deadline = time.monotonic() + 30
    while "user='u-e2e' accepted and ignored" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    stream = v1.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, stream=True,
                                   stream_options={"include_usage": True, "continuous_usage_stats": True})  # type: ignore[typeddict-unknown-key]
    usages = [c.usage.completion_tokens for c in stream if c.usage]
    assert usages[-1] == 3 and usages == sorted(usages) and len(usages) >= 3


def test_metrics_have_no_created_series(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "semipd:generation_tokens_total" in text and "semipd:e2e_request_latency_seconds_count" in text
    assert "_created" not in text


def test_smg_takes_the_server_for_sglang(server: ServerProcess, tmp_path: Path) -> None:
    smg = Path(sys.executable).parent / "smg"
    if not smg.exists():
        pytest.skip("needs the smg gateway binary (semipd-server[pd])")
    port = free_port()
    with open(tmp_path / "smg.log", "wb") as log:
        proc = subprocess.Popen([str(smg), "launch", "--worker-urls", server.url, "--host", "127.0.0.1", "--port",
                                 str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        url, workers = f"http://127.0.0.1:{port}", []
        deadline = time.monotonic() + 120
        while not workers:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "smg.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):  # not up yet
                workers = [w for w in httpx.get(f"{url}/workers", timeout=5).json()["workers"]
                           if w["status"] == "ready"]
            time.sleep(0.5)
        assert [w["runtime_type"] for w in workers] == ["sglang"]  # although /version answers (vLLM's probe)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
        assert r.usage and r.usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(10)
