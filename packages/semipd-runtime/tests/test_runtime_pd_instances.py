"""A prefill Engine and a decode Engine (threads of this process, the default model) hand requests over through
the real bootstrap server and the real Mooncake transfer engine (TCP): greedy outputs equal one unified Engine's
and every page comes back on both sides."""

from __future__ import annotations

import itertools
import time

import pytest

pytest.importorskip("mooncake.engine", reason="needs the Mooncake transfer engine (semipd-server[pd])")

from semipd_runtime import Engine, EngineStats, SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Write a haiku about the sea. " * 3]
_rooms = itertools.count(1000)


def _wait_idle(engine: Engine, deadline_s: float = 20.0) -> EngineStats:
    end = time.monotonic() + deadline_s
    while True:
        s = engine.refresh_stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.pages_used == 0:
            return s
        assert time.monotonic() < end, f"not idle: {s}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pair():
    prefill = Engine(disaggregation_mode="prefill", disaggregation_bootstrap_port=0, page_size=4)
    port = prefill._client.core.kv_sender.server.port  # type: ignore[union-attr]
    decode = Engine(disaggregation_mode="decode", disaggregation_bootstrap_port=port, page_size=4)
    yield prefill, decode
    decode.shutdown()
    prefill.shutdown()


def _pd_generate(prefill: Engine, decode: Engine, prompt: str, params: SamplingParams) -> list[str]:
    room = next(_rooms)
    boot = ("127.0.0.1", None, room)
    done = []
    p = prefill.submit(prompt, params, sink=lambda _x: None, bootstrap=boot)
    d = decode.submit(prompt, params, sink=done.append, bootstrap=boot)
    end = time.monotonic() + 60
    while not d.finished:
        assert time.monotonic() < end, "decode did not finish"
        time.sleep(0.01)
    assert d.error is None, d.error
    out = d.snapshot(final=True)
    assert p is not None
    return [c.text for c in out.outputs]


def test_pd_pair_matches_unified(pair) -> None:
    prefill, decode = pair
    params = SamplingParams(temperature=0, max_tokens=12, n=2)
    with Engine(page_size=4) as unified:
        want = [[c.text for c in o.outputs] for o in unified.generate(PROMPTS, params)]
    got = [_pd_generate(prefill, decode, p, params) for p in PROMPTS]
    assert got == want
    for e in (prefill, decode):
        s = _wait_idle(e)
        assert s.pages_used == 0
    assert prefill.stats().pd_transfers == 2 * len(PROMPTS)
    assert prefill.stats().pd_bytes > 0


def test_page_indices_before_the_prefill_request(pair) -> None:
    """The decode's page indices reach the prefill before the prefill's own copy of the request (the gateway sends
    both at once): the room keeps them, the KV lands, and the output equals the unified one."""
    prefill, decode = pair
    sender = prefill._client.core.kv_sender  # type: ignore[union-attr]
    params = SamplingParams(temperature=0, max_tokens=6)
    with Engine(page_size=4) as unified:
        want = unified.generate([PROMPTS[0]], params)[0].outputs[0].text
    room = next(_rooms)
    boot = ("127.0.0.1", None, room)
    d = decode.submit(PROMPTS[0], params, sink=lambda _x: None, bootstrap=boot)
    end = time.monotonic() + 30
    while not any(k.startswith(f"{room}:") and r.dst is not None for k, r in list(sender.rooms.items())):
        assert time.monotonic() < end, "the decode's page indices never reached the prefill"
        time.sleep(0.01)
    prefill.submit(PROMPTS[0], params, sink=lambda _x: None, bootstrap=boot)
    _finish(d, 60)
    assert d.error is None, d.error
    assert d.snapshot(final=True).outputs[0].text == want


def test_decode_without_room_is_rejected(pair) -> None:
    from semipd_runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        pair[1].submit("hi", SamplingParams(max_tokens=2))
    assert e.value.param == "bootstrap_room"


def test_pd_pair_through_a_host_mirror_matches_unified(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path with the non-CUDA Mooncake build: pages go pool -> host mirror -> peer mirror -> pool, in
    several bounded Mooncake batches (a long prompt's scattered pages overflow one)."""
    from semipd_runtime import kv_transfer

    monkeypatch.setenv("SEMIPD_KV_STAGING", "1")
    monkeypatch.setattr(kv_transfer, "MAX_BATCH_ENTRIES", 7)
    prefill = Engine(disaggregation_mode="prefill", disaggregation_bootstrap_port=0, page_size=4)
    try:
        sender = prefill._client.core.kv_sender  # type: ignore[union-attr]
        decode = Engine(disaggregation_mode="decode", disaggregation_bootstrap_port=sender.server.port, page_size=4)
        try:
            params = SamplingParams(temperature=0, max_tokens=8)
            with Engine(page_size=4) as unified:
                want = [[c.text for c in o.outputs] for o in unified.generate(PROMPTS, params)]
            assert [_pd_generate(prefill, decode, p, params) for p in PROMPTS] == want
            receiver = decode._client.core.executor.transport  # type: ignore[union-attr]
            assert sender.transport.mirror is not None and receiver.mirror is not None
            assert sender.transport.staged_bytes == receiver.staged_bytes > 0
            for e in (prefill, decode):
                assert _wait_idle(e).pages_used == 0
        finally:
            decode.shutdown()
    finally:
        prefill.shutdown()


def _finish(req, deadline_s: float) -> float:
    t0 = time.monotonic()
    while not req.finished:
        assert time.monotonic() - t0 < deadline_s, "request did not finish"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_refused_at_the_prefill_or_never_landed_fails_the_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """(1) The prefill turns the request away (its context is shorter): the decode hears it through the room at
    once instead of waiting out the transfer timeout. (2) The KV never comes (the prefill never got the request):
    the decode fails it after the waiting timeout, but its pages stay parked until the prefill answers the abort;
    then every page is back (well before the fallback of twice the timeout)."""
    from semipd_runtime.errors import InvalidRequestError, KvTransferError

    monkeypatch.setenv("SEMIPD_DISAGGREGATION_WAITING_TIMEOUT", "3")
    prefill = Engine(disaggregation_mode="prefill", disaggregation_bootstrap_port=0, page_size=4, max_model_len=16)
    try:
        port = prefill._client.core.kv_sender.server.port  # type: ignore[union-attr]
        with Engine(disaggregation_mode="decode", disaggregation_bootstrap_port=port, page_size=4) as decode:
            boot = ("127.0.0.1", None, next(_rooms))
            prompt, params = "Write a haiku about the sea. " * 3, SamplingParams(temperature=0, max_tokens=4)
            d = decode.submit(prompt, params, sink=lambda _x: None, bootstrap=boot)
            with pytest.raises(InvalidRequestError):
                prefill.submit(prompt, params, sink=lambda _x: None, bootstrap=boot)
            assert _finish(d, 2.5) < 2.5  # before the 3 s waiting timeout
            assert isinstance(d.error, KvTransferError) and "prefill failed" in str(d.error)
            assert _wait_idle(decode).pages_used == 0

            d = decode.submit("The capital of France is", SamplingParams(max_tokens=4), sink=lambda _x: None,
                              bootstrap=("127.0.0.1", None, next(_rooms)))
            _finish(d, 30)
            assert isinstance(d.error, KvTransferError) and "timed out" in str(d.error)
            assert _wait_idle(decode, deadline_s=2.5).pages_used == 0
    finally:
        prefill.shutdown()
