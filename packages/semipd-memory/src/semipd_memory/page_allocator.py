"""PageAllocator: the single owner of the KV pool's pages.

Pages are handed out to request *slots*. A slot is a row of `req_to_page`, the int32 page table the attention
kernels read (`req_to_page[slot, i]` is the i-th page of the request, -1 past its end). Bookkeeping lives in plain
Python lists so that alloc/free never touch the device except to write the rows that changed.

Every page is in exactly one state: free, owned by a live slot, or parked. A slot is *parked* when its request
finished while another worker (the writer, e.g. the prefill worker) may still be writing its pages: the pages come
back only when that writer reports done (`writer_done`) or is declared dead (`writer_dead`), never earlier, and
exactly once.
"""

from __future__ import annotations

import torch

_FREE, _LIVE, _PARKED = 0, 1, 2
_STATE_NAMES = {_FREE: "free", _LIVE: "live", _PARKED: "parked"}


class OutOfPagesError(RuntimeError):
    """A request for more pages than the pool or a slot can ever hold (a caller bug, not a shortage)."""


def _check_count(name: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class PageAllocator:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_requests: int,
        max_pages_per_request: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_pages = _check_count("num_pages", num_pages, minimum=1)
        self.page_size = _check_count("page_size", page_size, minimum=1)
        self.max_requests = _check_count("max_requests", max_requests, minimum=1)
        self.max_pages_per_request = _check_count("max_pages_per_request", max_pages_per_request, minimum=1)
        self.device = torch.device(device)
        self.req_to_page = torch.full(
            (max_requests, max_pages_per_request), -1, dtype=torch.int32, device=self.device
        )
        # stacks popped from the end: the lowest ids are handed out first (deterministic, easy to read in tests)
        self._free_pages: list[int] = list(range(num_pages - 1, -1, -1))
        self._free_slots: list[int] = list(range(max_requests - 1, -1, -1))
        self._slot_pages: list[list[int]] = [[] for _ in range(max_requests)]
        self._slot_state: list[int] = [_FREE] * max_requests
        self._parked_writer: dict[int, str] = {}  # parked slot -> writer that may still write its pages
        self._num_parked_pages = 0

    # --- queries --------------------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_used_pages(self) -> int:
        """Pages not free: owned by live slots plus parked ones."""
        return self.num_pages - len(self._free_pages)

    @property
    def num_parked_pages(self) -> int:
        return self._num_parked_pages

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def live_slots(self) -> list[int]:
        return [s for s, st in enumerate(self._slot_state) if st == _LIVE]

    def parked_slots(self) -> dict[int, str]:
        """Parked slot -> writer it waits for."""
        return dict(self._parked_writer)

    def pages_needed(self, num_tokens: int) -> int:
        _check_count("num_tokens", num_tokens)
        return -(-num_tokens // self.page_size)

    def can_alloc(self, num_pages: int) -> bool:
        _check_count("num_pages", num_pages)
        return bool(self._free_slots) and num_pages <= len(self._free_pages)

    def pages(self, slot: int) -> list[int]:
        """The slot's pages in order (live or parked). A copy: mutating it changes nothing."""
        self._check_slot(slot, (_LIVE, _PARKED), "pages")
        return list(self._slot_pages[slot])

    # --- alloc / extend / free ------------------------------------------------------------------------------
    def alloc(self, num_pages: int) -> int | None:
        """A new slot holding `num_pages` fresh pages (0 is allowed), or None when pages or slots are short."""
        _check_count("num_pages", num_pages)
        self._check_capacity(num_pages, "alloc")
        if not self._free_slots or num_pages > len(self._free_pages):
            return None
        slot = self._free_slots.pop()
        pages = self._take(num_pages)
        self._slot_pages[slot] = pages
        self._slot_state[slot] = _LIVE
        self._write_row(slot, 0, pages)
        return slot

    def extend(self, slot: int, num_pages: int) -> bool:
        """Append `num_pages` pages to a live slot; False (nothing changed) when the pool is short."""
        self._check_slot(slot, (_LIVE,), "extend")
        _check_count("num_pages", num_pages)
        held = self._slot_pages[slot]
        self._check_capacity(len(held) + num_pages, f"extend of slot {slot} (holding {len(held)} pages)")
        if num_pages > len(self._free_pages):
            return False
        if num_pages:
            new = self._take(num_pages)
            self._write_row(slot, len(held), new)
            held.extend(new)
        return True

    def free(self, slot: int) -> None:
        """Return a live slot and its pages, exactly once."""
        self._check_slot(slot, (_LIVE,), "free")
        self._release(slot)

    def free_deferred(self, slot: int, writer: str) -> None:
        """The request is finished but `writer` may still write its pages: park them until it is done or dead."""
        if not isinstance(writer, str) or not writer:
            raise ValueError(f"writer must be a non-empty str, got {writer!r}")
        self._check_slot(slot, (_LIVE,), "free_deferred")
        self._slot_state[slot] = _PARKED
        self._parked_writer[slot] = writer
        self._num_parked_pages += len(self._slot_pages[slot])

    def writer_done(self, slot: int) -> None:
        """The writer of a parked slot reported done: release the slot and its pages."""
        self._check_slot(slot, (_PARKED,), "writer_done")
        self._unpark(slot)

    def writer_dead(self, writer: str) -> int:
        """Release everything parked for `writer` (it will never write again). Returns the pages freed."""
        freed = 0
        for slot in [s for s, w in self._parked_writer.items() if w == writer]:
            freed += len(self._slot_pages[slot])
            self._unpark(slot)
        return freed

    # --- integrity ------------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Every page is free, parked or owned by exactly one live slot; tables match. Raises AssertionError."""
        owner: dict[int, str] = {}

        def claim(page: int, who: str) -> None:
            assert 0 <= page < self.num_pages, f"page {page} ({who}) is out of range [0, {self.num_pages})"
            assert page not in owner, f"page {page} is held twice: by {owner[page]} and by {who}"
            owner[page] = who

        for page in self._free_pages:
            claim(page, "the free list")
        free_slots = set(self._free_slots)
        assert len(free_slots) == len(self._free_slots), "a slot is on the free-slot list twice"
        parked_pages = 0
        table = self.req_to_page.cpu().tolist()
        for slot, state in enumerate(self._slot_state):
            pages = self._slot_pages[slot]
            assert (state == _FREE) == (slot in free_slots), (
                f"slot {slot} is {_STATE_NAMES[state]} but {'not ' if slot not in free_slots else ''}"
                "on the free-slot list"
            )
            assert (state == _PARKED) == (slot in self._parked_writer), f"slot {slot} parked bookkeeping mismatch"
            assert state != _FREE or not pages, f"free slot {slot} still lists pages {pages}"
            assert len(pages) <= self.max_pages_per_request, f"slot {slot} holds {len(pages)} pages"
            for page in pages:
                claim(page, f"{_STATE_NAMES[state]} slot {slot}")
            if state == _PARKED:
                parked_pages += len(pages)
            expected = pages + [-1] * (self.max_pages_per_request - len(pages))
            assert table[slot] == expected, f"req_to_page row {slot} is {table[slot]}, expected {expected}"
        assert parked_pages == self._num_parked_pages, (
            f"parked page count {self._num_parked_pages} != {parked_pages} pages in parked slots"
        )
        missing = self.num_pages - len(owner)
        assert missing == 0, f"{missing} pages leaked (neither free nor held), e.g. " + str(
            sorted(set(range(self.num_pages)) - set(owner))[:8]
        )

    # --- internals ------------------------------------------------------------------------------------------
    def _check_slot(self, slot: int, allowed: tuple[int, ...], op: str) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"{op}: slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.max_requests:
            raise ValueError(f"{op}: slot {slot} is out of range [0, {self.max_requests})")
        state = self._slot_state[slot]
        if state not in allowed:
            want = " or ".join(_STATE_NAMES[a] for a in allowed)
            raise ValueError(f"{op}: slot {slot} is {_STATE_NAMES[state]}, expected {want} (double free?)")

    def _check_capacity(self, total: int, op: str) -> None:
        if total > self.max_pages_per_request:
            raise OutOfPagesError(
                f"{op}: {total} pages exceed max_pages_per_request={self.max_pages_per_request}"
            )
        if total > self.num_pages:
            raise OutOfPagesError(f"{op}: {total} pages exceed the whole pool (num_pages={self.num_pages})")

    def _take(self, n: int) -> list[int]:
        if n == 0:
            return []
        taken = self._free_pages[-n:]
        del self._free_pages[-n:]
        taken.reverse()
        return taken

    def _write_row(self, slot: int, start: int, pages: list[int]) -> None:
        if pages:
            self.req_to_page[slot, start : start + len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def _release(self, slot: int) -> None:
        pages = self._slot_pages[slot]
        if pages:
            self.req_to_page[slot, : len(pages)] = -1
            self._free_pages.extend(reversed(pages))
        self._slot_pages[slot] = []
        self._slot_state[slot] = _FREE
        self._free_slots.append(slot)

    def _unpark(self, slot: int) -> None:
        del self._parked_writer[slot]
        self._num_parked_pages -= len(self._slot_pages[slot])
        self._release(slot)
