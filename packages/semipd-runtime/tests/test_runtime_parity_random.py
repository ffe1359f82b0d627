"""Greedy parity with transformers on small random-weight Llama / Mistral / Qwen2 / Qwen3 models (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from semipd_runtime.config import EngineConfig  # noqa: E402
from semipd_runtime.core import EngineCore  # noqa: E402
from semipd_runtime.messages import AddRequest, CoreSampling  # noqa: E402

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2,
)
CONFIGS = {
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama31-untied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2-bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3-qknorm": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=32)),
}


def write_random_model(kind: str, out: Path, seed: int = 0) -> torch.nn.Module:
    cls, extra = CONFIGS[kind]
    cfg = cls(**BASE, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
    with torch.no_grad():  # biases default to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    return model


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # compared with ignore_eos: no EOS suppression or stopping
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_pool_clean(core: EngineCore, evict: bool = True) -> None:
    """No request holds a page (the rest are free or cached-evictable); evicting the cache frees the pool."""
    a = core.allocator
    a.check_integrity()
    assert a.num_used_pages == 0 and a.num_free_pages + a.num_evictable_pages == a.num_pages
    if evict:
        core.cache.evict(a.num_pages)
        assert a.num_free_pages == a.num_pages and a.num_cached_pages == 0
        a.check_integrity()


def run_core(path: Path, prompts: list[list[int]], n: int, **kw: int) -> list[list[int]]:
    cfg = EngineConfig.from_knobs(model_path=str(path), device="cpu", dtype="float32", max_model_len=512,
                                  eos_token_ids=[], num_pages=kw.pop("num_pages", 256),
                                  page_size=kw.pop("page_size", 4), **kw)
    core = EngineCore(cfg)
    for i, p in enumerate(prompts):
        core.add_request(AddRequest(f"r{i}", p, CoreSampling(temperature=0.0, max_tokens=n, ignore_eos=True)))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for ev in core.run_until_idle():
        assert ev.error is None, ev.error
        out[ev.rid] += ev.token_ids
    assert_pool_clean(core)
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 9, 64)]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_matches_transformers(kind: str, tmp_path: Path, prompts: list[list[int]]) -> None:
    model = write_random_model(kind, tmp_path)
    want = [hf_greedy(model, p, 12) for p in prompts]
    got = run_core(tmp_path, prompts, 12, chunked_prefill_size=512)
    assert got == want


def test_chunked_prefill_tiny_budget_same_tokens(tmp_path: Path, prompts: list[list[int]]) -> None:
    write_random_model("llama-tied", tmp_path)
    full = run_core(tmp_path, prompts, 10, chunked_prefill_size=512)
    tiny = run_core(tmp_path, prompts, 10, chunked_prefill_size=7, max_running_requests=3)
    assert tiny == full


def test_preemption_under_page_pressure_same_tokens(tmp_path: Path, prompts: list[list[int]]) -> None:
    write_random_model("qwen2-bias", tmp_path)
    roomy = run_core(tmp_path, prompts, 16)
    # 30 pages of 4 tokens cannot hold all six requests at once: decode must preempt and recompute
    tight = run_core(tmp_path, prompts, 16, num_pages=30)
    assert tight == roomy
