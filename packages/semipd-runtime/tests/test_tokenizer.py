"""Tokenizer on the converted default model against transformers' own GGUF tokenizer; chat templates
rendered like transformers; special-token config handling; the incremental detokenizer on multi-byte text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_runtime.models.default_model import default_gguf_path, default_model_path
from semipd_runtime.tokenizer import IncrementalDetokenizer, Tokenizer, load_chat_template

TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading and trailing  ",
    " 12345 abc 3.14159 1,000,000 + 2.5e-3 = ? 2024-01-31",
    "héllo naïve café Ünïcödé ẞ Ω ≈ ∑ 𝔘𝔫𝔦",
    "日本語のテキスト，中文。한국어 текст на русском العربية",
    "😀😃😄 👨‍👩‍👧 🤖🇫🇷",
    "I'm you're they'll we'd IT'S",
    "def f(x):\n    return x**2  \n\n\tif x != 0:\r\n\t\tpass  # ok\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>x<file_sep>y<|endoftext|>z<jupyter_code>",
    "<|im_start |> not special, <im_end> neither",
    "    indented\n        more\n\n\n",
    "{\"json\": [1, 2.0, null], \"k\": \"v\"}",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 😀"},
     {"role": "user", "content": "Écris du code:\n```py\nprint(1)\n```"}],
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    transformers = pytest.importorskip("transformers")
    gguf = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.slow  # transformers parses the default model's whole GGUF file for its tokenizer
def test_ids_equal_transformers_gguf_tokenizer(tok: Tokenizer, hf_tok: Any) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids) == text
    # SmolLM2's pre-tokenizer splits every digit apart
    assert [tok.id_to_token(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_ids_equal_transformers_on_random_text(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text)


def test_special_tokens_and_vocab(tok: Tokenizer, hf_tok: Any) -> None:
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_ids == [hf_tok.eos_token_id] == [2]
    assert tok.vocab_size == len(hf_tok) == 49152
    assert [tok.id_to_token(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.encode("hi")[0] != tok.bos_token_id  # SmolLM2 adds no BOS


def test_chat_template_equals_transformers(tok: Tokenizer, hf_tok: Any) -> None:
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ref_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            if hasattr(ref_ids, "keys"):  # transformers 5 returns a BatchEncoding
                ref_ids = ref_ids["input_ids"]
            assert tok.encode(text, add_special_tokens=False) == list(ref_ids)
    text = tok.apply_chat_template(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


FEATURE_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'bad' %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "  {{ m['role'] }}: {{ m['content'] | tojson }} {{ m.get('meta', {}) | tojson(indent=1) }}\n"
    "{% generation %}[{{ ns.n }}]{% endgeneration %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant ({{ strftime_now('%Y') | length }}):{% endif %}{{ eos_token }}"
)


def test_template_features_match_transformers(tok: Tokenizer, model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer(tok.backend, tok.config, None, FEATURE_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "<b>&'x'</b>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "quote \" <tag> & é", "meta": {"k": [1, 2]}},
                {"role": "skip", "content": "x"}, {"role": "assistant", "content": "ok"}]
    for kwargs in ({"tools": tools}, {}):
        want = hf.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == want
    assert "<b>&'x'</b>" in ours.apply_chat_template(messages, tools=tools)  # tojson does not HTML-escape
    with pytest.raises(jinja2.TemplateError, match="bad role: bad"):
        ours.apply_chat_template([{"role": "bad", "content": ""}])
    with pytest.raises(TypeError, match="messages"):
        ours.apply_chat_template("hi")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tools"):
        ours.apply_chat_template(messages, tools="get_weather")  # type: ignore[arg-type]
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed
        Tokenizer(tok.backend, tok.config, None, "{{ ''.__class__.__mro__ }}").apply_chat_template(messages)


def _copy_tokenizer(src: Path, dst: Path, tok_cfg: dict[str, Any] | None = None,
                    gen_cfg: dict[str, Any] | None = None) -> Path:
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    base = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**base, **(tok_cfg or {})}))
    if gen_cfg is not None:
        (dst / "generation_config.json").write_text(json.dumps(gen_cfg))
    return dst


def test_config_handling(model_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # tokenizer.json's post-processor decides about BOS; the config flag is ignored then, as in transformers
    bos_dir = _copy_tokenizer(model_dir, tmp_path / "bos", {"add_bos_token": True})
    ours, hf = Tokenizer.from_dir(bos_dir), transformers.AutoTokenizer.from_pretrained(str(bos_dir))
    for text in ("Hello", "", "<|im_start|>x"):
        assert ours.encode(text) == hf.encode(text) == ours.encode(text, add_special_tokens=False)
    # ... and a post-processor that adds BOS is honoured (add_special_tokens=False leaves it out)
    with_pp = json.loads((model_dir / "tokenizer.json").read_text())
    with_pp["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (bos_dir / "tokenizer.json").write_text(json.dumps(with_pp))
    ours, hf = Tokenizer.from_dir(bos_dir), transformers.AutoTokenizer.from_pretrained(str(bos_dir))
    for text in ("Hello", "", "<|im_start|>x"):
        assert ours.encode(text) == hf.encode(text) == [1] + ours.encode(text, add_special_tokens=False)
    # without any post-processor, the tokenizer_config flags apply
    with_pp["post_processor"] = None
    (bos_dir / "tokenizer.json").write_text(json.dumps(with_pp))
    bare = Tokenizer.from_dir(bos_dir)
    assert bare.encode("Hello") == [1, 19556] and bare.encode("Hello", add_special_tokens=False) == [19556]
    # eos ids: generation_config (int or list) first, then tokenizer_config's eos
    listed = Tokenizer.from_dir(_copy_tokenizer(model_dir, tmp_path / "l", {"eos_token": "<|endoftext|>"},
                                                {"eos_token_id": [2, 5]}))
    assert listed.eos_token_ids == [2, 5, 0]
    as_dict = {"eos_token": {"content": "<|im_end|>"}}
    single = Tokenizer.from_dir(_copy_tokenizer(model_dir, tmp_path / "s", as_dict, {"eos_token_id": 2}))
    assert single.eos_token_ids == [2] and single.eos_token == "<|im_end|>"
    # errors
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    no_template = Tokenizer.from_dir(_copy_tokenizer(model_dir, tmp_path / "nt", {"chat_template": None}))
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="text"):
        no_template.encode(b"bytes")  # type: ignore[arg-type]


MULTIBYTE = "naïve café — 日本語のテキスト 😀👨‍👩‍👧 ẞ𝔘 done."


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_detokenizer_reproduces_decode(tok: Tokenizer, chunk: int) -> None:
    prompt = tok.encode("Say something:")
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == MULTIBYTE
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(deltas) == detok.text == MULTIBYTE
    assert all("\ufffd" not in d for d in deltas)
    if chunk == 1:
        assert "" in deltas  # some tokens end mid-character and were held back
    assert detok.flush() == ""


def test_incremental_detokenizer_every_split_point(tok: Tokenizer) -> None:
    ids = tok.encode(MULTIBYTE)
    for cut in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tok, [])
        first, second = detok.add(ids[:cut]), detok.add(ids[cut:])
        assert first + second == MULTIBYTE, cut
        assert "\ufffd" not in first
        # what was emitted after the first part is exactly the longest complete-character prefix
        assert MULTIBYTE.startswith(first)


def test_incremental_detokenizer_special_tokens_and_flush(tok: Tokenizer) -> None:
    ids = tok.encode("a<|im_end|>b", add_special_tokens=False)
    skip = IncrementalDetokenizer(tok, [1])
    assert "".join(skip.add([i]) for i in ids) == "ab"
    keep = IncrementalDetokenizer(tok, [1], skip_special_tokens=False)
    assert "".join(keep.add([i]) for i in ids) == "a<|im_end|>b"
    # a sequence that stops mid-character: held back, then flushed as the replacement character
    emoji = tok.encode("ok 😀", add_special_tokens=False)
    cut = IncrementalDetokenizer(tok, [])
    shown = "".join(cut.add([i]) for i in emoji[:-1])
    assert shown == "ok" and "\ufffd" in tok.decode(emoji[:-1])
    assert shown + cut.flush() == tok.decode(emoji[:-1]) == cut.text


def test_load_chat_template(tmp_path: Path) -> None:
    """--chat-template: a file or the template itself; a syntax error or a missing file fails at once."""
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_chat_template(inline) == inline
    path = tmp_path / "t.jinja"
    path.write_text(inline + "!")
    assert load_chat_template(str(path)) == inline + "!"
    with pytest.raises(ValueError, match="does not compile"):
        load_chat_template("{% for m in messages %}")
    with pytest.raises(FileNotFoundError):
        load_chat_template(str(tmp_path / "missing.jinja"))
