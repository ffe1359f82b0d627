"""The per-thread SM budget that grid-sizing kernels plan for (green-context partitions set it per role)."""

from __future__ import annotations

import threading

import pytest
import torch

from semipd_kernels import current_sm_budget, sm_budget
from semipd_kernels.testing import test_device


def test_budget_nests_and_is_per_thread() -> None:
    assert current_sm_budget() is None
    seen: list[int | None] = []
    with sm_budget(56):
        with sm_budget(8):
            assert current_sm_budget() == 8
        assert current_sm_budget() == 56
        t = threading.Thread(target=lambda: seen.append(current_sm_budget()))
        t.start()
        t.join()
    assert seen == [None] and current_sm_budget() is None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_sms"), sm_budget(bad):  # type: ignore[arg-type]
            pass


def test_decode_attention_plans_splits_for_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    dec = pytest.importorskip("semipd_kernels.triton.decode_attention")
    asked: list[int] = []
    real = dec.choose_num_splits
    monkeypatch.setattr(dec, "choose_num_splits", lambda b, h, c, n: asked.append(n) or real(b, h, c, n))
    g = torch.Generator().manual_seed(0)
    dev = test_device()
    q = torch.randn(2, 4, 16, generator=g).to(dev)
    k = torch.randn(8, 4, 2, 16, generator=g).to(dev)
    v = torch.randn(8, 4, 2, 16, generator=g).to(dev)
    table = torch.arange(8, dtype=torch.int32).view(2, 4).to(dev)
    lens = torch.tensor([13, 9], dtype=torch.int32).to(dev)
    plain = dec.decode_attention(q, k, v, table, lens, 0.25)
    with sm_budget(3):
        budgeted = dec.decode_attention(q, k, v, table, lens, 0.25)
    assert asked[1] == 3 and asked[0] != 3  # without a budget: the device's (8 on CPU)
    torch.testing.assert_close(plain, budgeted)
