"""GGUF -> HF conversion: the real default model against transformers' own GGUF loader, a synthetic GGUF
round trip (exact weights, Q/K un-permutation, untied head), the cache (written once, atomic, reused) and
path errors."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from semipd_runtime.models.default_model import (
    cache_dir_for,
    converted_gguf_dir,
    default_gguf_path,
    default_model_path,
    resolve_model_path,
)
from semipd_runtime.models.gguf_convert import _unpermute_rotary, convert_gguf, main


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    # the user cache, as the engine tests use it: on a fresh CI machine this fixture pays the conversion
    start = time.perf_counter()
    path = default_model_path()
    print(f"\ndefault model ready in {time.perf_counter() - start:.1f}s at {path}")
    return path


def _snapshot(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what convert_hf_to_gguf does to q_proj/k_proj rows (written out independently of the converter)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- the real default model ---

def test_default_model_files(default_model_dir: Path) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (576, 1536, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "float32")
    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    specials = (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"])
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    assert json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    weights = load_file(str(default_model_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert len(weights) == 2 + 30 * 9


@pytest.fixture(scope="module")
def hf_gguf_model() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    import transformers.modeling_utils as modeling_utils

    # transformers insists on `accelerate` for GGUF files but does not use it on this CPU path; it is not a
    # dependency we may add, so the check is lifted for this reference load only
    modeling_utils.is_accelerate_available = lambda: True  # type: ignore[attr-defined]
    gguf = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.slow  # the default model loaded twice (ours and transformers' GGUF loader)
def test_logits_equal_transformers_gguf_load(default_model_dir: Path, hf_gguf_model: torch.nn.Module) -> None:
    from transformers import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(str(default_model_dir)).eval()
    assert ours.dtype == torch.float32 and ours.config.tie_word_embeddings
    prompts = [
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712],
        [504, 3575, 282, 4649, 314] + list(range(100, 160, 7)),
    ]
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            ref = hf_gguf_model(x).logits
            got = ours(x).logits
            assert got.shape == ref.shape == (1, len(ids), 49152)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# --- synthetic GGUF round trip ---

def _byte_alphabet() -> list[str]:
    # GPT-2's printable spelling of the 256 bytes (the form byte-level vocabularies are stored in)
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = 0
    chars = []
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], heads: int, kv_heads: int, *,
                     arch: str = "llama", f16: set[str] = frozenset()) -> list[str]:
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_alphabet() + ["he", "ll", "hell", "hello"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(24)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e", "l l", "he ll", "hell o"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, w in weights.items():
        writer.add_tensor(name, w.astype(np.float16) if name in f16 else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_synthetic_gguf_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    heads, kv_heads, head_dim, hidden, inter, vocab = 4, 2, 4, 16, 24, 263
    hf = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)),
          "model.norm.weight": rng.standard_normal(hidden),
          "lm_head.weight": rng.standard_normal((vocab, hidden))}
    gg = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter),
              "attn_norm": (hidden,), "ffn_norm": (hidden,)}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for layer in range(2):
        for kind, shape in shapes.items():
            key = f"model.layers.{layer}.{names[kind]}.weight"
            hf[key] = rng.standard_normal(shape)
            gg[f"blk.{layer}.{kind}.weight"] = key
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    stored = {}
    for gname, hname in gg.items():
        w = hf[hname]
        if ".attn_q." in gname:
            w = _llama_cpp_permute(w, heads)
        elif ".attn_k." in gname:
            w = _llama_cpp_permute(w, kv_heads)
        stored[gname] = w
    half = {"blk.1.ffn_up.weight"}
    src = tmp_path / "tiny.gguf"
    tokens = _write_tiny_gguf(src, stored, heads, kv_heads, f16=half)

    out = convert_gguf(src, tmp_path / "tiny-hf", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(hf)
    for name, w in hf.items():
        expect = w.astype(np.float16).astype(np.float32) if name == "model.layers.1.mlp.up_proj.weight" else w
        np.testing.assert_array_equal(got[name], expect, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["head_dim"] == head_dim and cfg["vocab_size"] == vocab
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (heads, kv_heads)
    assert cfg["rope_theta"] == 5000.0

    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("hello<|im_end|>12")
    # add_bos_token was set; digits are split apart ("smollm" pre-tokenizer)
    assert enc.ids == [1, tokens.index("hello"), 2, tokens.index("1"), tokens.index("2")]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello12"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is True and tok_cfg["chat_template"].startswith("{% for m in messages %}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-hf", "tiny.gguf"]  # no temp dir left behind


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(1)
    for n_head, rows in ((9, 576), (3, 192), (1, 8)):
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        np.testing.assert_array_equal(_unpermute_rotary(_llama_cpp_permute(w, n_head), n_head), w)
        bias = rng.standard_normal(rows).astype(np.float32)
        np.testing.assert_array_equal(_unpermute_rotary(_llama_cpp_permute(bias, n_head), n_head), bias)


def test_unsupported_gguf_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "other.gguf"
    _write_tiny_gguf(src, {"token_embd.weight": np.zeros((263, 16), np.float32)}, 4, 2, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- cache, CLI, path resolution ---

def _tiny_gguf(path: Path) -> Path:
    _write_tiny_gguf(path, {"token_embd.weight": np.ones((263, 16), np.float32),
                            "output_norm.weight": np.ones(16, np.float32)}, 4, 2)
    return path


def test_cache_written_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMIPD_CACHE_DIR", str(tmp_path / "cache"))
    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    target = cache_dir_for(gguf)
    assert target.parent == tmp_path / "cache" / "models" and not target.exists()
    results: list[Path] = []
    workers = [threading.Thread(target=lambda: results.append(converted_gguf_dir(gguf, progress=False)))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results == [target] * 3
    before = _snapshot(target)
    assert set(before) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json"}
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []
    time.sleep(0.01)
    assert converted_gguf_dir(gguf, progress=False) == target == resolve_model_path(gguf)
    assert _snapshot(target) == before  # nothing rewritten
    # a changed file (new mtime) gets its own directory, converted afresh; a half-written directory without
    # config.json (left by a crashed older converter) and stale temp dirs are replaced, not trusted
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh = cache_dir_for(gguf)
    assert fresh != target
    fresh.mkdir()
    (fresh / "junk").write_text("x")
    (fresh.parent / f".{fresh.name}.tmp-dead").mkdir()
    assert converted_gguf_dir(gguf, progress=False) == fresh
    assert set(_snapshot(fresh)) == set(before)
    assert [p.name for p in fresh.parent.iterdir() if ".tmp-" in p.name] == []


def test_default_model_cache_reused(default_model_dir: Path) -> None:
    before = _snapshot(default_model_dir)
    start = time.perf_counter()
    assert default_model_path() == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert _snapshot(default_model_dir) == before


def test_cli_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = _tiny_gguf(tmp_path / "tiny.gguf")
    assert main([str(tiny), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    with pytest.raises(SystemExit):  # not empty: refuse to overwrite
        main([str(tiny), "--out", str(tmp_path / "hf"), "--quiet"])
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")])
    assert "missing.gguf" in capsys.readouterr().err


def test_resolve_model_path(tmp_path: Path, default_model_dir: Path) -> None:
    assert resolve_model_path(None) == default_model_dir
    assert resolve_model_path(default_gguf_path()) == default_model_dir
    assert resolve_model_path(str(default_model_dir)) == default_model_dir
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        resolve_model_path(tmp_path / "weights.bin")
    with pytest.raises(TypeError, match="model_path"):
        resolve_model_path(42)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="gguf_path"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    shutil.copy(default_model_dir / "config.json", tmp_path / "config.json")
    assert resolve_model_path(os.fspath(tmp_path)) == tmp_path
