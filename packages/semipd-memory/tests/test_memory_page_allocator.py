from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from semipd_memory import OutOfPagesError, PageAllocator


def row(alloc: PageAllocator, slot: int) -> list[int]:
    return alloc.req_to_page[slot].tolist()


def test_alloc_extend_free_tables() -> None:
    a = PageAllocator(num_pages=8, page_size=4, max_requests=3, max_pages_per_request=5)
    assert a.pages_needed(0) == 0 and a.pages_needed(1) == 1 and a.pages_needed(4) == 1 and a.pages_needed(5) == 2
    s0 = a.alloc(3)
    assert s0 == 0 and a.pages(s0) == [0, 1, 2] and row(a, s0) == [0, 1, 2, -1, -1]
    s1 = a.alloc(0)
    assert s1 == 1 and a.pages(s1) == [] and row(a, s1) == [-1] * 5
    assert a.extend(s1, 2) and a.pages(s1) == [3, 4] and row(a, s1) == [3, 4, -1, -1, -1]
    assert a.extend(s0, 0) and a.pages(s0) == [0, 1, 2]
    assert a.num_free_pages == 3 and a.num_used_pages == 5
    assert a.alloc(4) is None and a.can_alloc(3) and not a.can_alloc(4)
    s2 = a.alloc(2)
    assert s2 == 2 and a.pages(s2) == [5, 6]
    assert not a.extend(s0, 2)  # only 1 page free: a normal failure, nothing changes
    assert a.pages(s0) == [0, 1, 2] and a.num_free_pages == 1
    a.check_integrity()
    a.free(s0)
    a.free(s2)
    assert row(a, s0) == [-1] * 5 and row(a, s2) == [-1] * 5 and a.num_free_pages == 6
    s3 = a.alloc(5)
    assert s3 is not None and len(set(a.pages(s3))) == 5 and not set(a.pages(s3)) & {3, 4}
    assert row(a, s3) == a.pages(s3)
    a.check_integrity()


def test_slots_run_out_is_a_normal_failure() -> None:
    a = PageAllocator(num_pages=10, page_size=1, max_requests=2, max_pages_per_request=10)
    assert a.alloc(1) is not None and a.alloc(1) is not None
    assert a.alloc(0) is None and not a.can_alloc(0)


def test_misuse_raises_clear_errors() -> None:
    a = PageAllocator(num_pages=4, page_size=2, max_requests=2, max_pages_per_request=3)
    with pytest.raises(OutOfPagesError, match="max_pages_per_request=3"):
        a.alloc(4)
    slot = a.alloc(2)
    assert slot is not None
    with pytest.raises(OutOfPagesError, match="max_pages_per_request"):
        a.extend(slot, 2)
    a.free(slot)
    with pytest.raises(ValueError, match=f"slot {slot} is free"):
        a.free(slot)
    with pytest.raises(ValueError, match="slot 1 is free"):
        a.free(1)  # never allocated
    with pytest.raises(ValueError, match="out of range"):
        a.free(7)
    with pytest.raises(TypeError, match="slot must be an int"):
        a.free("0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_pages must be >= 0"):
        a.alloc(-1)
    with pytest.raises(ValueError, match="num_tokens"):
        a.pages_needed(-3)
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        PageAllocator(0, 2, 2, 2)
    with pytest.raises(TypeError, match="page_size must be an int"):
        PageAllocator(4, 2.0, 2, 2)  # type: ignore[arg-type]
    with pytest.raises(OutOfPagesError, match="whole pool"):
        PageAllocator(4, 2, 2, 8).alloc(5)


def test_deferred_free_parks_pages_until_writer_done() -> None:
    a = PageAllocator(num_pages=6, page_size=2, max_requests=4, max_pages_per_request=6)
    s0, s1, s2 = a.alloc(2), a.alloc(2), a.alloc(1)
    assert s0 is not None and s1 is not None and s2 is not None
    a.free_deferred(s0, "batch-0")
    a.free_deferred(s1, "batch-1")
    a.free_deferred(s2, "step-7")
    # parked pages are neither free nor reusable, and the slot's row still names them (the writer may write)
    assert a.num_free_pages == 1 and a.num_used_pages == 5 and a.num_parked_pages == 5
    assert a.alloc(2) is None
    assert row(a, s0)[:2] == a.pages(s0) == [0, 1]
    a.check_integrity()
    with pytest.raises(ValueError, match="parked"):
        a.free(s0)
    with pytest.raises(ValueError, match="parked"):
        a.free_deferred(s0, "batch-0")
    with pytest.raises(ValueError, match="writer must be"):
        a.free_deferred(3, "")
    with pytest.raises(ValueError, match="not parked for writer"):
        a.writer_done("batch-0", {s1: [2]})
    with pytest.raises(ValueError, match="not own pages"):
        a.writer_done("batch-0", {s0: [4]})
    assert a.parked_for("batch-0") == [s0]
    assert a.writer_done("batch-0") == 2
    assert a.num_free_pages == 3 and row(a, s0) == [-1] * 6
    assert a.writer_done("batch-0") == 0  # exactly once: nothing is parked for it any more
    assert a.writer_done("nobody") == 0
    assert a.writer_done("batch-1", {s1: [a.pages(s1)[0]]}) == 2  # its first page goes to the cache
    assert a.num_cached_pages == 1 and a.num_evictable_pages == 1
    assert a.num_parked_pages == 1 and a.parked_slots() == {s2: "step-7"}
    assert a.writer_done("step-7") == 1
    a.uncache([2])
    assert a.num_free_pages == 6 and a.num_used_pages == 0
    a.check_integrity()


def test_integrity_detects_corruption() -> None:
    a = PageAllocator(num_pages=4, page_size=2, max_requests=2, max_pages_per_request=4)
    slot = a.alloc(2)
    assert slot is not None
    a._free_pages.append(a.pages(slot)[0])  # a page both free and owned
    with pytest.raises(AssertionError, match="held twice"):
        a.check_integrity()
    b = PageAllocator(num_pages=4, page_size=2, max_requests=2, max_pages_per_request=4)
    b._free_pages.pop()  # a leaked page
    with pytest.raises(AssertionError, match="leaked"):
        b.check_integrity()
    c = PageAllocator(num_pages=4, page_size=2, max_requests=2, max_pages_per_request=4)
    c.req_to_page[1, 0] = 3  # a table row that lies
    with pytest.raises(AssertionError, match="req_to_page row 1"):
        c.check_integrity()


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/extend/free/abort/deferred-free interleavings against a plain model of who owns what."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.a = PageAllocator(num_pages=24, page_size=4, max_requests=6, max_pages_per_request=10)
        self.model: dict[int, list[int]] = {}  # live slot -> pages
        self.parked: dict[int, tuple[str, list[int]]] = {}  # parked slot -> (writer, pages)

    def used(self) -> int:
        return sum(map(len, self.model.values())) + sum(len(p) for _, p in self.parked.values())

    @rule(target=live, n=st.integers(0, 12))
    def alloc(self, n: int) -> int:
        if n > self.a.max_pages_per_request:
            with pytest.raises(OutOfPagesError):
                self.a.alloc(n)
            return -1
        fits = n <= self.a.num_pages - self.used() and len(self.model) + len(self.parked) < self.a.max_requests
        slot = self.a.alloc(n)
        assert (slot is not None) == fits
        if slot is None:
            return -1
        assert slot not in self.model and slot not in self.parked
        self.model[slot] = self.a.pages(slot)
        assert len(self.model[slot]) == n
        return slot

    @rule(slot=live, n=st.integers(0, 6))
    def extend(self, slot: int, n: int) -> None:
        if slot not in self.model:
            return
        before = list(self.model[slot])
        if len(before) + n > self.a.max_pages_per_request:
            with pytest.raises(OutOfPagesError):
                self.a.extend(slot, n)
            return
        ok = self.a.extend(slot, n)
        assert ok == (n <= self.a.num_pages - self.used())
        if ok:
            self.model[slot] = self.a.pages(slot)
            assert self.model[slot][: len(before)] == before and len(self.model[slot]) == len(before) + n
        else:
            assert self.a.pages(slot) == before

    @rule(slot=consumes(live))
    def free(self, slot: int) -> None:
        if slot in self.model:
            self.a.free(slot)
            del self.model[slot]
        elif slot >= 0 and slot not in self.parked:
            with pytest.raises(ValueError, match=f"slot {slot}"):
                self.a.free(slot)  # double free

    @rule(slot=consumes(live), writer=st.sampled_from(["prefill", "standby"]))
    def abort_while_writing(self, slot: int, writer: str) -> None:
        if slot in self.model:
            self.a.free_deferred(slot, writer)
            self.parked[slot] = (writer, self.model.pop(slot))

    @rule(writer=st.sampled_from(["prefill", "standby", "ghost"]))
    def writer_done(self, writer: str) -> None:
        gone = [s for s, (w, _) in self.parked.items() if w == writer]
        expected = sum(len(self.parked[s][1]) for s in gone)
        assert self.a.writer_done(writer) == expected
        for s in gone:
            del self.parked[s]
        assert self.a.writer_done(writer) == 0

    @invariant()
    def consistent(self) -> None:
        self.a.check_integrity()
        owned = [p for pages in self.model.values() for p in pages] + [
            p for _, pages in self.parked.values() for p in pages
        ]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert self.a.num_used_pages == len(owned) == self.used()
        assert self.a.num_free_pages + len(owned) == self.a.num_pages
        assert self.a.num_parked_pages == sum(len(p) for _, p in self.parked.values())
        for slot, pages in self.model.items():
            assert self.a.pages(slot) == pages

    def teardown(self) -> None:
        for slot in list(self.model):
            self.a.free(slot)
        self.a.writer_done("prefill")
        self.a.writer_done("standby")
        self.a.check_integrity()
        assert self.a.num_free_pages == self.a.num_pages, "pages leaked after everything finished"


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_req_to_page_on_requested_device_and_dtype() -> None:
    a = PageAllocator(num_pages=4, page_size=2, max_requests=2, max_pages_per_request=3, device="cpu")
    assert a.req_to_page.dtype == torch.int32 and a.req_to_page.shape == (2, 3)
    assert a.req_to_page.device.type == "cpu"
