from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from semipd_memory import SharedModelWeights, bind_tensors, module_tensors

sys.path.insert(0, str(Path(__file__).parent))
import memory_ipc_worker as ipc


def test_bind_rebuilds_identical_module_over_the_same_memory() -> None:
    torch.manual_seed(1)
    owner = ipc.tiny_lm().eval()
    tensors = module_tensors(owner)
    assert "head.weight" in tensors and "inv_freq" in tensors  # tied and non-persistent names are all there
    rebuilt = bind_tensors(ipc.tiny_lm, tensors)
    assert isinstance(rebuilt, ipc.TinyLM) and not rebuilt.training
    for (name, a), (_, b) in zip(owner.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), f"{name} was copied"
    assert rebuilt.head.weight is rebuilt.embed.weight  # the tie survives
    assert rebuilt.inv_freq.data_ptr() == owner.inv_freq.data_ptr()
    assert not any(p.requires_grad for p in rebuilt.parameters())
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), owner(ids))


def test_bind_reports_missing_extra_and_misshapen_names() -> None:
    tensors = module_tensors(ipc.tiny_lm())
    missing = {n: t for n, t in tensors.items() if n != "blocks.1.2.bias"}
    with pytest.raises(ValueError, match=r"lack 1 .*blocks\.1\.2\.bias"):
        bind_tensors(ipc.tiny_lm, missing)
    extra = dict(tensors, **{"lora.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"1 names the module lacks: lora\.weight"):
        bind_tensors(ipc.tiny_lm, extra)
    assert isinstance(bind_tensors(ipc.tiny_lm, extra, strict=False), ipc.TinyLM)
    bad = dict(tensors, **{"blocks.0.0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"blocks\.0\.0\.weight: module expects shape \(64, 32\)"):
        bind_tensors(ipc.tiny_lm, bad)
    with pytest.raises(TypeError, match=r"module_factory must return an nn\.Module"):
        bind_tensors(lambda: 3, tensors)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="module_factory must be callable"):
        bind_tensors(None, tensors)  # type: ignore[arg-type]


def test_state_dict_source_lacks_non_persistent_buffers() -> None:
    weights = SharedModelWeights(ipc.tiny_lm().state_dict())
    try:
        with pytest.raises(ValueError, match="inv_freq"):
            SharedModelWeights.load(weights.handle, ipc.tiny_lm)
        # a module without non-persistent buffers rebuilds from its state dict alone
        lin = nn.Linear(3, 2)
        lw = SharedModelWeights(lin.state_dict())
        got = SharedModelWeights.load(lw.handle, lambda: nn.Linear(3, 2))
        assert got.weight.data_ptr() == lin.weight.data_ptr()
        lw.close()
    finally:
        weights.close()
    with pytest.raises(TypeError, match=r"source must be an nn\.Module or a state dict"):
        SharedModelWeights([torch.ones(1)])  # type: ignore[arg-type]
