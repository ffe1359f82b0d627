"""--load-format dummy: a model directory with only config.json runs with random weights at its shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.messages import AddRequest, CoreSampling
from semipd_runtime.models.loader import load_model

CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")


@pytest.fixture()
def config_only(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def generate(path: Path, load_format: str) -> list[int]:
    core = EngineCore(EngineConfig.from_knobs(model_path=str(path), device="cpu", dtype="float32", max_model_len=128,
                                 eos_token_ids=[], num_pages=32, page_size=4, load_format=load_format))
    core.add_request(AddRequest("r", [5, 6, 7, 8, 9], CoreSampling(temperature=0.0, max_tokens=6, ignore_eos=True)))
    return [t for ev in core.run_until_idle() for t in ev.token_ids]


def test_dummy_weights_run_and_are_reproducible(config_only: Path) -> None:
    model = load_model(config_only, load_format="dummy")
    assert model.lm_head is not None and model.lm_head.weight.shape == (300, 64)
    assert float(model.lm_head.weight.std()) == pytest.approx(0.02, rel=0.2)  # random, not zeros
    assert torch.all(model.norm.weight == 1.0)
    first = generate(config_only, "dummy")
    assert len(first) == 6 and first == generate(config_only, "dummy")  # seeded: same weights every start


def test_auto_needs_safetensors_and_bad_format_is_named(config_only: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"safetensors.*load-format dummy"):
        load_model(config_only)
    with pytest.raises(ValueError, match="load_format"):
        load_model(config_only, load_format="random")
