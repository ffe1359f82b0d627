"""Tensor-parallel sharding without processes: which head counts split (and the errors naming what does not),
each rank's slice of every tensor kind, and TP=1 building exactly the unsharded model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from semipd_runtime.config import EngineConfig, cli_knobs
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, load_model
from semipd_runtime.parallel.shard import TensorParallel, check_tp_size, shard_config, shard_hf_tensor

BASE = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=257,
    hidden_size=32,
    intermediate_size=48,
    num_layers=1,
    num_heads=9,
    num_kv_heads=3,
    head_dim=4,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    rope_scaling=None,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    qkv_bias=True,
    qk_norm=False,
    torch_dtype=torch.float32,
)


def test_head_counts_that_cannot_split_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    check_tp_size(BASE, 1)
    check_tp_size(BASE, 3)  # one KV head per rank
    check_tp_size(
        dataclasses.replace(BASE, num_heads=8, num_kv_heads=2, intermediate_size=64), 8
    )  # KV replicated
    with pytest.raises(
        ValueError, match=r"tp_size=2 cannot split the model's 9 query heads.*fit this model: 1, 3"
    ):
        check_tp_size(BASE, 2)
    with pytest.raises(ValueError, match="3 KV heads"):
        check_tp_size(dataclasses.replace(BASE, num_heads=12, intermediate_size=48), 4)
    with pytest.raises(ValueError, match="MLP's 50 columns"):
        check_tp_size(dataclasses.replace(BASE, intermediate_size=50), 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 .* does not match tp_size=3"):
        check_tp_size(BASE, 3)
    monkeypatch.delenv("WORLD_SIZE")
    if torch.cuda.device_count() < 3:
        with pytest.raises(ValueError, match="needs 3 GPUs"):
            check_tp_size(BASE, 3, "cuda")


def test_knob_flags_and_mode() -> None:
    (tp,) = [k for k in cli_knobs() if k.name == "tp_size"]
    assert tp.knob.flags == ("--tp-size", "--tp", "--tensor-parallel-size") and tp.default == 1
    assert EngineConfig.from_knobs(tp_size=4).parallel.tp_size == 4
    with pytest.raises(ValueError, match="tp_size must be >= 1"):
        EngineConfig.from_knobs(tp_size=0)
    assert EngineConfig.from_knobs(tp_size=2, mode="semi-pd").parallel.tp_size == 2
    with pytest.raises(ValueError, match="slo' with tp_size > 1"):
        EngineConfig.from_knobs(tp_size=2, mode="semi-pd", partition_policy="slo")


def test_each_rank_slices_its_heads_columns_and_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    hd, h = BASE.head_dim, BASE.hidden_size
    full = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(9 * hd, h, generator=g),
        "model.layers.0.self_attn.k_proj.bias": torch.randn(3 * hd, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(h, 9 * hd, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(48, h, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(h, 48, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(h, generator=g),
    }
    for name, t in full.items():
        parts = [shard_hf_tensor(BASE, TensorParallel(r, 3), name, t) for r in range(3)]
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        if "norm" in name:
            assert all(p is t for p in parts)  # replicated
        else:
            assert torch.equal(torch.cat(parts, dim=dim), t), name
    emb = torch.randn(257, h, generator=g)
    parts = [shard_hf_tensor(BASE, TensorParallel(r, 2), "model.embed_tokens.weight", emb) for r in range(2)]
    assert [p.shape[0] for p in parts] == [129, 129]  # equal slices; the last ends in one zero padding row
    assert torch.equal(torch.cat(parts)[:257], emb) and not parts[1][-1].any()


def test_fewer_kv_heads_than_ranks_are_replicated_to_the_ranks_whose_queries_use_them() -> None:
    cfg = dataclasses.replace(BASE, num_heads=4, num_kv_heads=2, intermediate_size=64)
    k = torch.arange(2 * cfg.head_dim, dtype=torch.float32)
    heads = [
        shard_hf_tensor(cfg, TensorParallel(r, 4), "model.layers.0.self_attn.k_proj.bias", k)[0].item() // 4
        for r in range(4)
    ]
    assert heads == [0, 0, 1, 1]  # query head r (rank r) belongs to KV group r // 2
    local = shard_config(cfg, TensorParallel(3, 4))
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (1, 1, 16)


def test_tp1_builds_the_unsharded_model() -> None:
    model = build_empty_model(BASE, torch.device("cpu"), torch.float32, TensorParallel(0, 1))
    assert model.tp is None and model.config is BASE
    assert all(layer.self_attn.tp is None and layer.mlp.tp is None for layer in model.layers)
    assert model.embed_tokens.weight.shape == (257, 32)
    shard = build_empty_model(BASE, torch.device("cpu"), torch.float32, TensorParallel(1, 3))
    assert shard.embed_tokens.weight.shape == (86, 32) and shard.config.num_kv_heads == 1
    assert shard.layers[0].self_attn.qkv_proj.weight.shape == (5 * 4, 32)  # 3 query heads + K + V of one head


def test_dummy_weights_of_a_rank_have_its_shapes(tmp_path: Path) -> None:
    """--load-format dummy under TP: random weights at the rank's shard shapes, norms replicated at one."""
    from test_runtime_load_format import CONFIG

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    shard = load_model(tmp_path, "cpu", torch.float32, "dummy", TensorParallel(1, 2))
    attn = shard.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((2 + 1 + 1) * 16, 64) and attn.o_proj.weight.shape == (64, 32)
    assert shard.lm_head is not None and shard.lm_head.weight.shape == (150, 64)
    assert torch.equal(shard.norm.weight, torch.ones(64)) and shard.embed_tokens.weight.std() > 0


def test_engine_names_a_tp_size_the_default_model_cannot_split_before_starting_anything() -> None:
    from semipd_runtime import Engine

    with pytest.raises(ValueError, match=r"split the model's 9 query heads.*fit this model: 1, 3\)"):
        Engine(tp_size=2, device="cpu")
    with pytest.raises(ValueError, match="sm_partition='mps' runs prefill as a process"):
        from semipd_runtime.parallel.semipd import check_semi_pd

        check_semi_pd(EngineConfig.from_knobs(tp_size=3, mode="semi-pd", sm_partition="mps"))
