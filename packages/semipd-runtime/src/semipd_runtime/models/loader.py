"""Build a model from an HF directory: config.json + *.safetensors (mmap), fused QKV / gate-up on load."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.parallel.shard import TensorParallel, shard_config, shard_hf_tensor

# HF name suffix -> (our param suffix, shard index within the fused param or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _shard_ranges(cfg: ModelConfig, fused: str) -> list[tuple[int, int]]:
    if fused == "self_attn.qkv_proj":
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    else:
        sizes = [cfg.intermediate_size, cfg.intermediate_size]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes))


def map_hf_name(cfg: ModelConfig, name: str) -> tuple[str, tuple[int, int] | None] | None:
    """HF tensor name -> (our parameter name, row range inside it); None for tensors we don't use."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return (None if cfg.tie_word_embeddings else ("lm_head.weight", None))
    m = _LAYER.match(name)
    if m is None:
        return None
    layer, module, kind = m.groups()
    if module in _FUSED:
        fused, shard = _FUSED[module]
        return f"layers.{layer}.{fused}.{kind}", _shard_ranges(cfg, fused)[shard]
    if module.endswith("rotary_emb.inv_freq"):
        return None
    return f"layers.{layer}.{module}.{kind}", None


def build_empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                      tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """Parameters allocated on `device` but not initialised (loading or random init fills them). With `tp`
    (more than one rank): this rank's shard of the full model `cfg`."""
    tp = tp if tp is not None and tp.size > 1 else None
    with torch.device("meta"):
        model = LlamaForCausalLM(shard_config(cfg, tp), tp)
    return model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]], source: str = "") -> None:
    """Copy HF-named tensors into `model` (fusing QKV / gate-up); every parameter must be filled."""
    cfg = model.config
    params = dict(model.named_parameters())
    loaded: dict[str, int] = {}
    for hf_name, src in tensors:
        target = map_hf_name(cfg, hf_name)
        if target is None:
            continue
        name, rows = target
        if name not in params:
            raise ValueError(f"{source}: tensor {hf_name} has no place in {cfg.architecture}")
        dst = params[name].data if rows is None else params[name].data[rows[0] : rows[0] + rows[1]]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{source}: {hf_name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)
        loaded[name] = loaded.get(name, 0) + 1
    expected = {n: (3 if "qkv_proj" in n else 2 if "gate_up_proj" in n else 1) for n in params}
    missing = [n for n, k in expected.items() if loaded.get(n, 0) < k]
    if missing:
        raise ValueError(f"{source} lacks weights for: {', '.join(missing[:8])}")


def _safetensors_items(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:  # mmap: tensors are read lazily
            for name in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                yield name, f.get_tensor(name)


LOAD_FORMATS = ("auto", "dummy")


def load_model(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    load_format: str = "auto", tp: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """load_format "auto": the directory's *.safetensors; "dummy": random weights at the config's shapes (only
    config.json is read), for benchmarking a model's shape without its weights, as vLLM's --load-format dummy.
    `tp` (more than one rank): load this rank's slice of each tensor (dummy: random weights, a seed per
    rank)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    tp = tp if tp is not None and tp.size > 1 else None
    model = build_empty_model(cfg, torch.device(device), dtype or cfg.torch_dtype, tp)
    if load_format == "dummy":
        init_random_weights(model, seed=0 if tp is None else tp.rank)  # norms (replicated) stay at one
        return model
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors file "
                                f"(--load-format dummy runs it with random weights)")
    items = _safetensors_items(files)
    if tp is not None:
        items = ((name, shard_hf_tensor(cfg, tp, name, t)) for name, t in items)
    load_weights(model, items, source=f"model directory {model_dir}")
    return model


def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights at real shapes, for GPU benchmarks of models we don't ship (norms stay at one)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, std, generator=gen)
