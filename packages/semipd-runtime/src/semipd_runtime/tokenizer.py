"""Tokenizer from a Hugging Face directory (tokenizer.json + tokenizer_config.json + generation_config.json)
with the chat template rendered as transformers renders it, and an incremental detokenizer for streaming."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config writes special tokens either as strings or as serialized AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant spans for training): render the body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares `tags` as a plain attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes (<, >, &, '), which chat templates must not do
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_env() -> ImmutableSandboxedEnvironment:
    # Same environment settings as transformers' apply_chat_template, so prompts render identically
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    return _template_env().from_string(source)


@lru_cache(maxsize=16)
def _template_reads_tools(source: str) -> bool:
    """The template reads a `tools` variable: it defines how tools are shown to the model (a template that
    never reads it would drop them silently)."""
    env = _template_env()
    return "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))


def load_chat_template(value: str) -> str:
    """--chat-template: a file holding the template, or the Jinja template itself; compiled once here so that a
    syntax error fails the start, not the first chat request."""
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # an inline template too long to be a file name
        is_file = False
    if is_file:
        source = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        source = value
    else:
        raise FileNotFoundError(f"chat_template {value!r} is neither a file nor a Jinja template")
    try:
        _compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template does not compile: {e}") from None
    return source


class Tokenizer:
    """Encode/decode with a `tokenizers` backend; special tokens and chat template from the HF configs."""

    def __init__(self, backend: _HFTokenizer, tokenizer_config: dict[str, Any],
                 generation_config: dict[str, Any] | None = None, chat_template: str | None = None) -> None:
        self.backend = backend
        self.config = tokenizer_config
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            if (text := _token_text(tokenizer_config.get(key))) is not None:
                self.special_tokens[key] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        gen = generation_config or {}
        self.bos_token_id: int | None = self._id_of(self.bos_token)
        if self.bos_token_id is None and gen.get("bos_token_id") is not None:
            self.bos_token_id = int(gen["bos_token_id"])
        self.pad_token_id: int | None = self._id_of(self.pad_token)
        eos = _as_id_list(gen.get("eos_token_id"))
        if (tok_eos := self._id_of(self.eos_token)) is not None:
            eos.append(tok_eos)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        # BOS/EOS on encode: tokenizer.json's post-processor decides (as in transformers 5, which ignores the
        # config flags whenever tokenizer.json exists); the tokenizer_config flags only apply without one
        self._config_specials = backend.post_processor is None
        eos_id = self._id_of(self.eos_token)
        self.add_bos_token = bool(tokenizer_config.get("add_bos_token", False)) and (
            self.bos_token_id is not None)
        self.add_eos_token = bool(tokenizer_config.get("add_eos_token", False)) and eos_id is not None
        self._eos_for_encode = eos_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer directory {root} has no tokenizer.json")
        config = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json") or {
            k: v for k, v in _read_json(root / "config.json").items() if k in ("bos_token_id", "eos_token_id")
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # older multi-template format: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(_HFTokenizer.from_file(str(tok_file)), config, gen, template)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not (add_special_tokens and self._config_specials):
            return self._encode_ids(text, add_special_tokens)
        ids = self._encode_ids(text, False)
        if self.add_bos_token:
            assert self.bos_token_id is not None  # add_bos_token is only set with one
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token:
            assert self._eos_for_encode is not None  # likewise
            ids.append(self._eos_for_encode)
        return ids

    def _encode_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        # the batch call releases the GIL while it works (`encode` holds it: a megabyte prompt tokenized in a
        # server thread would stall its event loop for seconds), and "fast" skips the offsets we never use,
        # whose thousands of small allocations are also freed under the GIL
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: tokenizers >= 0.21
        return batch([text], add_special_tokens=add_special_tokens)[0].ids  # type: ignore[no-any-return]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def supports_tools(self) -> bool:
        """The chat template renders tool definitions (it reads `tools`)."""
        return self.chat_template is not None and _template_reads_tools(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """Render `messages` to the prompt string (encode it with add_special_tokens=False, as transformers
        does)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                             "and no chat_template.jinja); pass a plain prompt instead")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of dicts")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise TypeError("tools must be a list of JSON-schema dicts or None")
        variables = {**self.special_tokens, **template_kwargs}
        return _compile_template(self.chat_template).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **variables)


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas that never split a UTF-8 character.

    Decodes a short window: ids [prefix_offset, read_offset) were already emitted, ids from read_offset on are
    new.
    The window starts inside the prompt so that tokenizers which drop a leading space at the start of a decode
    (sentencepiece) still produce it for the first generated token."""

    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prompt_ids[-self._PROMPT_CONTEXT:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is unfinished)."""
        self._ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # nothing new, or the tail is an incomplete multi-byte character: wait for more bytes
        delta = full_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: emit what is held back (an unfinished character decodes as U+FFFD)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        delta = full_text[len(prefix_text):] if full_text.startswith(prefix_text) else ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta
