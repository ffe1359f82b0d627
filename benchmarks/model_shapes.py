"""Real model shapes for random-weight benchmarks on the GPU (no weight download needed)."""

from __future__ import annotations

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


def with_layers(cfg: dict[str, Any], layers: int | None) -> dict[str, Any]:
    return cfg if layers is None else dict(cfg, num_hidden_layers=layers)
