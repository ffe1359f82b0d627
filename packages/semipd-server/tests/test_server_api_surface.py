"""The routes and request fields vLLM / SGLang clients and the smg gateway use, through the `openai` client over
the fake engine: model cards and aliases, /version, /ping, /tokenize, extension fields accepted (and what they do),
stream_options.continuous_usage_stats, chat_template_kwargs, and /generate in SGLang's shape."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
from server_fake_engine import FakeEngine, logprob_of

from semipd_server.app import build_app

Check = Callable[[openai.AsyncOpenAI, openai.AsyncOpenAI], Awaitable[None]]


def serve(check: Check, names: list[str] | None = None) -> None:
    """`check(v1, root)`: the openai client on /v1 and on the server root (SGLang / vLLM routes)."""
    app = build_app(FakeEngine(), names)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            v1 = openai.AsyncOpenAI(base_url="http://t/v1", api_key="none", http_client=http, max_retries=0)
            await check(v1, v1.with_options(base_url="http://t"))

    asyncio.run(main())


async def post(client: openai.AsyncOpenAI, path: str, body: dict[str, Any]) -> Any:
    return await client.post(path, body=body, cast_to=object)


def test_models_list_every_name_and_retrieve_404s_unknown() -> None:
    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        ids = [m.id for m in (await v1.models.list()).data]
        assert ids == ["main", "alias"]
        card = await v1.models.retrieve("alias")
        assert (card.id, card.owned_by) == ("alias", "sglang")  # smg reads owned_by to pick SGLang's protocol
        with pytest.raises(openai.NotFoundError) as info:
            await v1.models.retrieve("nope")
        assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
        # either name is accepted as `model`; the first one is what responses carry
        r = await v1.completions.create(model="alias", prompt="abc", max_tokens=2)
        assert r.model == "main"
        with pytest.raises(openai.BadRequestError):
            await v1.completions.create(model="fake-model", prompt="abc", max_tokens=2)

    serve(check, ["main", "alias"])


def test_version_ping_and_info_routes() -> None:
    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        version = (await root.get("/version", cast_to=object))["version"]  # type: ignore[index]
        assert isinstance(version, str) and version
        assert (await root.get("/ping", cast_to=httpx.Response)).status_code == 200
        info = await root.get("/get_server_info", cast_to=object)
        assert info["version"] == version and info["tp_size"] == 1  # type: ignore[index]
        model = await root.get("/model_info", cast_to=object)
        assert model["context_length"] == 64 and model["is_generation"]  # type: ignore[index]
        assert (await root.get("/health_generate", cast_to=httpx.Response)).status_code == 200

    serve(check)


def test_tokenize_and_detokenize() -> None:
    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        for client, path in ((root, "/tokenize"), (v1, "/tokenize")):
            r = await post(client, path, {"prompt": "hey", "return_token_strs": True})
            assert r == {"count": 3, "max_model_len": 64, "tokens": [104, 101, 121], "token_strs": ["h", "e", "y"]}
        r = await post(root, "/v1/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                               "chat_template_kwargs": {"x": 1}})
        assert "".join(map(chr, r["tokens"])) == "<x=1><user>hi<assistant>"
        # add_generation_prompt: its own field, or through chat_template_kwargs as vLLM allows
        for body in ({"add_generation_prompt": False}, {"chat_template_kwargs": {"add_generation_prompt": False}}):
            r = await post(root, "/tokenize", {"messages": [{"role": "user", "content": "hi"}], **body})
            assert "".join(map(chr, r["tokens"])) == "<user>hi"
        assert (await post(v1, "/detokenize", {"tokens": [104, 105]})) == {"prompt": "hi"}
        with pytest.raises(openai.BadRequestError):
            await post(v1, "/detokenize", {"tokens": [-1]})
        with pytest.raises(openai.BadRequestError):
            await post(v1, "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]})

    serve(check)


def test_extension_fields_accepted_and_output_unchanged() -> None:
    ignored: dict[str, Any] = {
        "user": "u1", "service_tier": "auto", "metadata": {"k": "v"}, "store": False,
        "spaces_between_special_tokens": False, "skip_special_tokens": True,
        "bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 7,  # not a PD instance
    }

    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        plain = await v1.completions.create(model="fake-model", prompt="abcd", max_tokens=3)
        extra = await v1.completions.create(model="fake-model", prompt="abcd", max_tokens=3, extra_body=ignored)
        assert extra.choices[0].text == plain.choices[0].text
        msgs: Any = [{"role": "user", "content": "hi"}]
        chat = await v1.chat.completions.create(
            model="fake-model", messages=msgs, max_tokens=3,
            extra_body={**ignored, "separate_reasoning": False, "stream_reasoning": False})
        base = await v1.chat.completions.create(model="fake-model", messages=msgs, max_tokens=3)
        assert chat.choices[0].message.content == base.choices[0].message.content
        # fields that would change the output stay refused
        with pytest.raises(openai.BadRequestError) as info:
            await v1.completions.create(model="fake-model", prompt="abcd", max_tokens=3, suffix="!")
        assert info.value.body["param"] == "suffix"  # type: ignore[index]

    serve(check)


def test_chat_template_kwargs_reach_the_template() -> None:
    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        msgs: Any = [{"role": "user", "content": "hi"}]
        base = await v1.chat.completions.create(model="fake-model", messages=msgs, max_tokens=1)
        more = await v1.chat.completions.create(model="fake-model", messages=msgs, max_tokens=1,
                                                extra_body={"chat_template_kwargs": {"lang": "fr"}})
        assert base.usage and more.usage
        assert more.usage.prompt_tokens == base.usage.prompt_tokens + len("<lang=fr>")
        with pytest.raises(openai.BadRequestError) as info:
            await v1.chat.completions.create(model="fake-model", messages=msgs, max_tokens=1,
                                             extra_body={"chat_template_kwargs": {"messages": []}})
        assert info.value.body["param"] == "chat_template_kwargs.messages"  # type: ignore[index]

    serve(check)


def test_continuous_usage_stats() -> None:
    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        stream = await v1.completions.create(
            model="fake-model", prompt="abcd", max_tokens=4, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True})  # type: ignore[typeddict-unknown-key]
        usages = [c.usage for c in [c async for c in stream]]
        assert all(u is not None for u in usages)
        assert [u.completion_tokens for u in usages if u] == [1, 2, 3, 4, 4]  # 4 token chunks + the usage chunk
        assert {u.prompt_tokens for u in usages if u} == {4}
        stream = await v1.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "ab"}], max_tokens=2, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert [c.usage is None for c in chunks] == [True] * (len(chunks) - 1) + [False]

    serve(check)


def test_generate_in_sglang_shape() -> None:
    async def check(v1: openai.AsyncOpenAI, root: openai.AsyncOpenAI) -> None:
        r = await post(root, "/generate", {"text": "abc", "sampling_params": {"max_new_tokens": 2},
                                            "return_logprob": True, "top_logprobs_num": 1,
                                            "return_text_in_logprobs": True})
        meta = r["meta_info"]
        assert (r["text"], r["output_ids"]) == ("cb", [99, 98])
        assert meta["finish_reason"] == {"type": "length", "length": 2}
        assert (meta["prompt_tokens"], meta["completion_tokens"]) == (3, 2)
        assert meta["output_token_logprobs"] == [[logprob_of(0), 99, "c"], [logprob_of(1), 98, "b"]]
        assert meta["output_top_logprobs"][0] == [[logprob_of(0), 99, "c"]]
        r = await post(root, "/generate", {"text": "abc", "sampling_params": {"max_new_tokens": 3, "stop": "b"}})
        assert (r["text"], r["meta_info"]["finish_reason"]) == ("c", {"type": "stop", "matched": "b"})
        with pytest.raises(openai.BadRequestError):  # prompt logprobs are not computed
            await post(root, "/generate", {"text": "abc", "return_logprob": True, "logprob_start_len": 0})

    serve(check)
