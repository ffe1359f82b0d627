"""--tp-size and its aliases (Semi-PD's --tp, vLLM's --tensor-parallel-size) reach Engine(tp_size=...)."""

from __future__ import annotations

import pytest

from semipd_server.cli import build_parser, engine_kwargs


@pytest.mark.parametrize("flag", ["--tp-size", "--tp", "--tensor-parallel-size"])
def test_tp_flags(flag: str) -> None:
    assert engine_kwargs(build_parser().parse_args([flag, "3"]))["tp_size"] == 3
    assert engine_kwargs(build_parser().parse_args([]))["tp_size"] == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args([flag, "0"])
