"""Structured output in the engine core: a random-weight model (tiny, over a byte-level vocabulary) samples
under grammar masks; every completion that ends with "stop" must match its grammar, in
unified mode (with and without overlap), in semi-PD mode (first token sampled by the prefill worker) and
across preemption. A random model walks the grammar at random: a stronger test than a model that already
writes JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers
from runtime_fixtures import core_config

from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.grammar import GrammarCompiler, StructuredOutput
from semipd_runtime.messages import AddRequest, CoreSampling, TokenEvent

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["a", "b", "c"]},
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "tag", "xs"],
    "additionalProperties": False,
}
REGEX = r"Z[0-9]{2}-(yes|no)"


MERGES = [("{", '"'), ('"', ":"), ('"', ","), ("t", "r"), ("tr", "u"), ("tru", "e"), ("a", "l"), ("s", "e"),
          (",", '"'), ("n", "a"), ("na", "m"), ("nam", "e")]  # multi-byte tokens that straddle JSON syntax
VOCAB = 320  # the model's logits are wider than the tokenizer's vocabulary: the masks ban the extra ids


def write_tokenizer(d: Path) -> None:
    """A byte-level BPE tokenizer: 3 special tokens, the 256 byte symbols and a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Llama over a small byte-level vocabulary (fast on CPU, every string reachable)."""
    d = tmp_path_factory.mktemp("grammar-model")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def compiler(model_dir: Path) -> GrammarCompiler:
    return GrammarCompiler(model_dir, VOCAB, 2)


def make_core(path: Path, mode: str = "unified", **kw: object) -> EngineCore:
    cfg = core_config(path, max_model_len=256, num_pages=kw.pop("num_pages", 400), mode=mode,
                      eos_token_ids=[2], prefill_placement="thread", chunked_prefill_size=16, max_prefill_tokens=64,
                      **kw)
    return create_core(cfg)


def run(core: EngineCore, grammars: list[str], max_tokens: int = 60, plain: int = 0,
        sampling: CoreSampling | None = None) -> dict[str, tuple[list[int], str | None]]:
    """Requests g<i> with grammars[i] and p<j> without; tokens and finish reason of each (preemptions of each
    in `core.test_preemptions`)."""
    sampling = sampling or CoreSampling(temperature=1.0, seed=7, max_tokens=max_tokens)
    for i, g in enumerate(grammars):
        core.add_request(AddRequest(f"g{i}", [5 + i, 17, 99, 4], sampling, grammar=g))
    for j in range(plain):
        core.add_request(AddRequest(f"p{j}", [8, 9 + j], sampling))
    live = dict(core.requests)
    out: dict[str, tuple[list[int], str | None]] = {}
    events: list[TokenEvent] = []
    for _ in range(10_000):
        events += core.step()
        if not core.has_work() and not core.pending:
            break
    for ev in events:
        toks, _ = out.get(ev.rid, ([], None))
        out[ev.rid] = (toks + ev.token_ids, ev.finish_reason)
    out["preemptions"] = ([sum(r.num_preemptions for r in live.values())], None)
    return out


def text_of(model_dir: Path, ids: list[int]) -> str:
    from semipd_runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir).decode(ids)


def check_json(model_dir: Path, out: dict[str, tuple[list[int], str | None]], n: int) -> int:
    """Every grammar request that stopped holds JSON valid against SCHEMA; returns how many stopped."""
    stopped = 0
    for i in range(n):
        ids, reason = out[f"g{i}"]
        assert reason in ("stop", "length"), (i, reason)
        if reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text_of(model_dir, ids)), SCHEMA)
    return stopped


def test_compiler_rejects_bad_specs_and_caches(compiler: GrammarCompiler) -> None:
    for spec in (StructuredOutput("json_schema", '{"type": "objectx"}'), StructuredOutput("json_schema", "{"),
                 StructuredOutput("regex", "(["), StructuredOutput("yaml", "")):
        with pytest.raises(InvalidRequestError):
            compiler.compile(spec)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    assert compiler.compile(spec) is compiler.compile(spec)


@pytest.mark.parametrize("overlap", [True, False])
def test_unified_outputs_match_the_schema(model_dir: Path, compiler: GrammarCompiler, overlap: bool) -> None:
    grammar = compiler.compile(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    core = make_core(model_dir, disable_overlap_schedule=not overlap)
    out = run(core, [grammar] * 6, plain=2)
    assert check_json(model_dir, out, 6) >= 4  # the schema is small: most finish within max_tokens
    assert all(len(out[f"p{j}"][0]) == 60 for j in range(2))  # rows without a grammar run unconstrained
    core.close()


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_penalties_and_logit_bias_under_a_grammar(model_dir: Path, compiler: GrammarCompiler, mode: str) -> None:
    # the sampler applies logit_bias, min_tokens and the penalties first and the grammar's mask last: a +100 bias
    # on tokens the grammar always bans (a special token, ids past the tokenizer's vocabulary) never brings them
    # back, and every output that stops still validates (semi-PD: the prefill worker's first token too)
    grammar = compiler.compile(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    boosted = [1, 300, 319]
    sampling = CoreSampling(temperature=1.0, seed=11, max_tokens=60, presence_penalty=1.5, frequency_penalty=0.5,
                            repetition_penalty=1.3, min_tokens=3, logit_bias=dict.fromkeys(boosted, 100.0))
    core = make_core(model_dir, mode)
    out = run(core, [grammar] * 6, plain=2, sampling=sampling)
    assert check_json(model_dir, out, 6) >= 4
    assert not {t for i in range(6) for t in out[f"g{i}"][0]} & set(boosted)
    for j in range(2):  # the bias is live: rows without a grammar sample nothing but the boosted tokens
        assert len(out[f"p{j}"][0]) == 60 and set(out[f"p{j}"][0]) <= set(boosted)
    core.close()


def test_semipd_first_token_obeys_the_grammar(model_dir: Path, compiler: GrammarCompiler) -> None:
    # a regex whose first character is forced: the prefill worker samples it under the item's mask
    grammar = compiler.compile(StructuredOutput("regex", REGEX))
    core = make_core(model_dir, "semi-pd")
    out = run(core, [grammar] * 4, max_tokens=20)
    for i in range(4):
        ids, reason = out[f"g{i}"]
        assert reason == "stop", (i, reason)
        assert re.fullmatch(REGEX, text_of(model_dir, ids)), text_of(model_dir, ids)
    core.close()


def test_preempted_requests_resume_their_grammar(model_dir: Path, compiler: GrammarCompiler) -> None:
    # a pool too small for every request at once: some are preempted and recomputed mid-output
    grammar = compiler.compile(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    core = make_core(model_dir, num_pages=30)
    out = run(core, [grammar] * 6)
    assert check_json(model_dir, out, 6) >= 4
    assert out["preemptions"][0][0] > 0
    core.close()


def test_a_grammar_the_core_cannot_build_is_refused(model_dir: Path) -> None:
    core = make_core(model_dir)
    core.add_request(AddRequest("bad", [5, 6], CoreSampling(max_tokens=4), grammar="start: /([/"))
    ev = core.step()
    assert [(e.rid, e.finish_reason, e.status) for e in ev] == [("bad", "abort", 400)]
    core.close()
