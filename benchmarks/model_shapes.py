"""Real model shapes for random-weight benchmarks on the GPU (no weight download needed)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

LLAMA31_8B: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)
LLAMA32_3B: dict[str, Any] = dict(
    LLAMA31_8B, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
# CPU smoke runs of the GPU benchmarks (same code path, seconds instead of minutes)
TINY: dict[str, Any] = dict(
    LLAMA31_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
)
SHAPES = {"llama-3.1-8b": LLAMA31_8B, "llama-3.2-3b": LLAMA32_3B, "tiny": TINY}


def datasheet_hbm_tbps(gpu_name: str) -> float:
    """Peak HBM bandwidth of the GPU by name (datasheet TB/s), for roofline columns: H200 4.8, H100 SXM 3.35."""
    return 4.8 if "H200" in gpu_name else 3.35


def with_layers(cfg: dict[str, Any], layers: int | None) -> dict[str, Any]:
    return cfg if layers is None else dict(cfg, num_hidden_layers=layers)


def write_model_dir(shape: str, out: Path, tokenizer_dir: Path, layers: int | None = None) -> Path:
    """A model directory for `--load-format dummy` serving runs: the shape's config.json beside a real
    tokenizer (tokenizer.json + tokenizer_config.json with its chat template). The vocabulary is cut to the
    tokenizer's, so every sampled id detokenizes to text (ids past it would stream as empty chunks and skew
    TTFT/ITL on the client); special token ids come from the tokenizer too."""
    from tokenizers import Tokenizer

    cfg = dict(with_layers(SHAPES[shape], layers))
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg["vocab_size"] = tok.get_vocab_size()
    cfg["model_type"] = "llama"  # every shape here is Llama-architecture; transformers/vLLM need the key
    src_path = tokenizer_dir / "config.json"
    src_cfg = json.loads(src_path.read_text()) if src_path.exists() else {}
    for key in ("bos_token_id", "eos_token_id"):
        if key in src_cfg:
            cfg[key] = src_cfg[key]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="write a dummy-weight model directory at a real shape")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer-dir", type=Path, required=True, help="a model dir with tokenizer.json")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(write_model_dir(args.shape, args.out, args.tokenizer_dir, args.layers))


if __name__ == "__main__":
    main()
