"""PD disaggregation pieces without a model: layout checks, page runs, the environment knobs."""

from __future__ import annotations

import pytest

from semipd_runtime.kv_transfer import _runs
from semipd_runtime.pd_types import KvLayout, PdEnv, room_key


def test_layout_mismatch_names_each_field() -> None:
    a = KvLayout(16, "float32", 30, 3, 64)
    assert a.mismatch(a) == ""
    msg = a.mismatch(KvLayout(32, "bfloat16", 30, 3, 64))
    assert "page_size: prefill 32 vs decode 16" in msg and "dtype: prefill bfloat16 vs decode float32" in msg
    assert "num_layers" not in msg


def test_runs_coalesce_only_where_both_sides_are_consecutive() -> None:
    assert _runs([4, 5, 6, 9], [10, 11, 12, 13]) == [((4, 7), 10), ((9, 10), 13)]
    assert _runs([1, 2], [5, 7]) == [((1, 2), 5), ((2, 3), 7)]
    assert _runs([], []) == []


def test_env_knobs_semipd_spelling_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PdEnv.load().bootstrap_timeout_s == 300 and PdEnv.load().heartbeat_max_failures == 2
    monkeypatch.setenv("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", "7")
    assert PdEnv.load().waiting_timeout_s == 7
    monkeypatch.setenv("SEMIPD_DISAGGREGATION_WAITING_TIMEOUT", "3")
    assert PdEnv.load().waiting_timeout_s == 3
    monkeypatch.setenv("SEMIPD_DISAGGREGATION_HEARTBEAT_INTERVAL", "soon")
    with pytest.raises(ValueError, match="SEMIPD_DISAGGREGATION_HEARTBEAT_INTERVAL"):
        PdEnv.load()
    assert room_key(12, 1) == "12:1"


def test_a_wildcard_bind_advertises_a_dialable_address() -> None:
    import socket

    from semipd_runtime.pd_bootstrap import advertised_host

    assert advertised_host("10.1.2.3") == "10.1.2.3"
    for wildcard in ("0.0.0.0", ""):
        addr = advertised_host(wildcard)
        assert addr not in ("0.0.0.0", "")
        socket.inet_aton(addr)  # an IPv4 address a peer can dial
        with socket.socket() as s:  # and one of ours: a socket binds to it
            s.bind((addr, 0))
