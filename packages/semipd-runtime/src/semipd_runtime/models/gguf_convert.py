"""Convert a llama.cpp GGUF file (Llama family, byte-level BPE vocabulary) into a plain HF directory.

Output: config.json, generation_config.json, model.safetensors (float32, HF tensor names), tokenizer.json,
tokenizer_config.json (bos/eos/pad + chat template). The directory appears atomically: everything is written
into a temporary sibling which is then renamed, so a directory that exists is always complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the output format changes: the cache key includes it, so old conversions are not reused.
CONVERTER_VERSION = 1

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# llama.cpp pre-tokenizer names -> split regex (None: GPT-2's own regex inside ByteLevel).
# "smollm" and its siblings split every digit apart first (as SmolLM2's tokenizer.json does:
# Digits(individual_digits) then ByteLevel).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX: dict[str, str | None] = {
    "default": None, "gpt-2": None, "gpt2": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class _Metadata:
    """Typed access to the GGUF key/value header."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ValueError(f"GGUF file {self._path} has no metadata key {key!r}")
        return self._fields[key].contents()


def _unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's Q/K row permutation.

    llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves (x_i, x_{i+d/2}). The converter
    reorders each head's rows from [half0 | half1] to interleaved; here we put them back."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_tensor_name(gguf_name: str) -> tuple[str, str | None]:
    """(HF name, 'q'/'k' when rows need un-permuting) for a GGUF tensor name."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name], None
    match = _LAYER_NAME.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart (unsupported model layout)")
    layer, kind, suffix = match.groups()
    rotary = {"attn_q": "q", "attn_k": "k"}.get(kind)
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}", rotary


def _model_config(meta: _Metadata, tensor_names: set[str], path: Path) -> dict[str, Any]:
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF file {path} has architecture {arch!r}; only 'llama' is supported")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"GGUF file {path} carries rope_freqs (Llama 3.1 rope scaling), "
                         "which is not supported")
    heads = int(meta.require("llama.attention.head_count"))
    hidden = int(meta.require("llama.embedding_length"))
    tokens = meta.require("tokenizer.ggml.tokens")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.require("llama.context_length")),
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith("attn_q.bias") for n in tensor_names),
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"GGUF file {path} uses rope scaling {scaling!r}; only 'linear' is supported")
        factor = float(meta.require("llama.rope.scaling.factor"))
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            cfg["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    return cfg


def _byte_level_tokenizer(meta: _Metadata, path: Path) -> Any:
    """tokenizers.Tokenizer equivalent to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF file {path} has tokenizer model {kind!r}; "
                         "only byte-level BPE ('gpt2') is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _DIGITS_THEN_GPT2 and pre not in _SPLIT_REGEX:
        raise ValueError(f"GGUF file {path} has pre-tokenizer {pre!r}, which this converter does not know")
    tokens: list[str] = list(meta.require("tokenizer.ggml.tokens"))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF file {path} has duplicate tokens in its vocabulary")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif (split := _SPLIT_REGEX[pre]) is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) must match whole and count as special; user-defined ones match whole
    # too but are ordinary text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        bos, eos = (tokens[int(meta.require(f"tokenizer.ggml.{k}_token_id"))] if flag else None
                    for k, flag in (("bos", add_bos), ("eos", add_eos)))

        def template(seq: str, type_id: int) -> str:
            parts = ([f"{bos}:{type_id}"] if bos else []) + [f"${seq}:{type_id}"]
            return " ".join(parts + ([f"{eos}:{type_id}"] if eos else []))

        single = template("A", 0)
        pair = single + " " + template("B", 1)
        special = [(t, vocab[t]) for t in (bos, eos) if t]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _tokenizer_config(meta: _Metadata, tokens: list[str], max_len: int) -> dict[str, Any]:
    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[int(token_id)]

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return cfg


def _generation_config(meta: _Metadata) -> dict[str, Any]:
    eos = [int(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("eos", "eot", "eom")
           if meta.get(f"tokenizer.ggml.{k}_token_id") is not None]
    eos = list(dict.fromkeys(eos))
    cfg: dict[str, Any] = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    for key, name in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
        if (token_id := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            cfg[name] = int(token_id)
    return cfg


def _write_weights(reader: Any, cfg: dict[str, Any], out: Path, progress: bool) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        name, rotary = _hf_tensor_name(t.name)
        # GGUF lists dims fastest-first; numpy/torch want them slowest-first ([out, in] for a linear)
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if rotary is not None:
            array = _unpermute_rotary(array, heads if rotary == "q" else kv_heads)
        tensors[name] = np.ascontiguousarray(array)
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - tensors.keys()
    if missing:
        raise ValueError(f"GGUF file has no tensor for {sorted(missing)}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 progress: bool = True) -> Path:
    """Write the HF directory for `gguf_path` at `out_dir` (which must not exist, or be empty); return it."""
    from gguf import GGUFReader

    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"gguf_path {src} is not a file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out_dir {out} already exists and is not an empty directory")
    reader = GGUFReader(str(src))
    meta = _Metadata(reader, src)
    cfg = _model_config(meta, {t.name for t in reader.tensors}, src)
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = _byte_level_tokenizer(meta, src)
        tokenizer.save(str(tmp / "tokenizer.json"))
        tok_cfg = _tokenizer_config(meta, tokens, cfg["max_position_embeddings"])
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(tmp / "generation_config.json", _generation_config(meta))
        _write_weights(reader, cfg, tmp, progress)
        # config.json last: a directory with config.json is a complete one
        _write_json(tmp / "config.json", cfg)
        # mkdtemp (and safetensors) create owner-only files; a shared cache should be readable like others
        tmp.chmod(0o755)
        for written in tmp.iterdir():
            written.chmod(0o644)
        if out.exists():
            # empty (checked above); a rename onto a non-empty dir fails, which is what racing writers need
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """CLI: semipd-convert-gguf [GGUF] [--out DIR]. Without GGUF, converts the bundled default model."""
    from semipd_runtime.models import default_model

    parser = argparse.ArgumentParser(prog="semipd-convert-gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="?", help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--out", help="output directory (default: the semipd model cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        src = Path(args.gguf) if args.gguf else default_model.default_gguf_path()
        if args.out:
            out = convert_gguf(src, args.out, progress=not args.quiet)
        else:
            out = default_model.converted_gguf_dir(src, progress=not args.quiet)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
