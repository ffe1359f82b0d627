"""Engine processes that compute side by side on CPU split the cores instead of each taking all of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from semipd_runtime.cpu_threads import share_cpu_threads, usable_cores


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("ways", [1, 2, 3, 64])
def test_cpu_processes_take_their_share_of_the_cores(threads: None, ways: int) -> None:
    share_cpu_threads("cpu", ways)
    assert torch.get_num_threads() == max(1, usable_cores() // ways)


def test_cuda_and_a_users_omp_num_threads_are_left_alone(threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    share_cpu_threads("cuda:0", 1)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    share_cpu_threads("cpu", 1)
    assert torch.get_num_threads() == 1
