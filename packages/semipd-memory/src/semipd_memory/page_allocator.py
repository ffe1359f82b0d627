"""PageAllocator: the single owner of the KV pool's pages.

Pages are handed out to request *slots*. A slot is a row of `req_to_page`, the int32 page table the attention
kernels read (`req_to_page[slot, i]` is the i-th page of the request, -1 past its end). Bookkeeping lives in plain
Python lists so that alloc/free never touch the device except to write the rows that changed.

Every page is in exactly one state: free, owned by a live slot, owned by a parked slot, or *cached*. A slot
is *parked* when its request finished while a writer may still write its pages (a prefill batch on another
worker, or a step still in flight on the device; each has a name): the pages come back only when that writer is
done (`writer_done(writer)`, also the call for a writer that died), never earlier, and exactly once.

A cached page belongs to the prefix cache (`RadixCache`); any number of slots may share it. A slot's row is
then its shared prefix (cached pages, counted in their reference counts) followed by its own pages. Freeing a
slot can hand some of its own full pages to the cache instead of the free list; only an unreferenced cached
page can leave the cache (`uncache`), so eviction never takes a page a request still reads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import torch

_FREE, _LIVE, _PARKED = 0, 1, 2
_STATE_NAMES = {_FREE: "free", _LIVE: "live", _PARKED: "parked"}


class CacheHooks(Protocol):
    """What the allocator calls on the prefix cache attached to it (see `attach_cache`)."""

    def slot_released(self, slot: int) -> None: ...
    def check_tree(self) -> None: ...


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
        self._num_parked_pages = 0  # own pages of parked slots
        self._slot_shared: list[int] = [0] * max_requests  # leading pages of the row borrowed from the cache
        self._cached: dict[int, int] = {}  # page held by the prefix cache -> number of slots sharing it
        self._num_evictable = 0  # cached pages no slot shares
        self._cache: CacheHooks | None = None

    def attach_cache(self, cache: CacheHooks) -> None:
        """The prefix cache over this pool: told when a slot is released, and checked by `check_integrity`."""
        if self._cache is not None:
            raise ValueError("attach_cache: this allocator already has a prefix cache")
        self._cache = cache

    # --- queries --------------------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_used_pages(self) -> int:
        """Pages requests hold: owned by live or parked slots, or cached and shared by at least one slot.
        Zero means no request holds a page (the rest are free or cached-evictable)."""
        return self.num_pages - len(self._free_pages) - self._num_evictable

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages no slot shares: the cache may hand them back to the free list."""
        return self._num_evictable

    def page_refs(self, page: int) -> int:
        """How many slots share a cached page."""
        refs = self._cached.get(page)
        if refs is None:
            raise ValueError(f"page_refs: page {page} is not cached")
        return refs

    def num_shared(self, slot: int) -> int:
        """Leading pages of the slot's row that are shared cached pages."""
        self._check_slot(slot, (_LIVE, _PARKED), "num_shared")
        return self._slot_shared[slot]

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
    def alloc(self, num_pages: int, shared: Sequence[int] = ()) -> int | None:
        """A new slot whose row is the cached pages `shared` followed by `num_pages` fresh pages (0 is
        allowed), or None when pages or slots are short."""
        _check_count("num_pages", num_pages)
        shared = list(shared)
        self.check_capacity(len(shared) + num_pages, "alloc")
        for page in shared:
            if page not in self._cached:
                raise ValueError(f"alloc: shared page {page} is not a cached page")
        if len(set(shared)) != len(shared):
            raise ValueError(f"alloc: shared pages repeat: {shared}")
        if not self._free_slots or num_pages > len(self._free_pages):
            return None
        slot = self._free_slots.pop()
        for page in shared:
            self._add_ref(page, 1)
        pages = shared + self._take(num_pages)
        self._slot_pages[slot] = pages
        self._slot_shared[slot] = len(shared)
        self._slot_state[slot] = _LIVE
        self._write_row(slot, 0, pages)
        return slot

    def extend(self, slot: int, num_pages: int) -> bool:
        """Append `num_pages` pages to a live slot; False (nothing changed) when the pool is short."""
        self._check_slot(slot, (_LIVE,), "extend")
        _check_count("num_pages", num_pages)
        held = self._slot_pages[slot]
        self.check_capacity(len(held) + num_pages, f"extend of slot {slot} (holding {len(held)} pages)")
        if num_pages > len(self._free_pages):
            return False
        if num_pages:
            new = self._take(num_pages)
            self._write_row(slot, len(held), new)
            held.extend(new)
        return True

    def free(self, slot: int, to_cache: Collection[int] = ()) -> None:
        """Return a live slot exactly once: its own pages in `to_cache` become cached (unreferenced), the
        others free; its shared pages lose one reference."""
        self._check_slot(slot, (_LIVE,), "free")
        keep = set(to_cache)
        own = self._slot_pages[slot][self._slot_shared[slot] :]
        stray = keep - set(own)
        if stray:
            raise ValueError(f"free: to_cache pages {sorted(stray)[:8]} are not own pages of slot {slot}")
        self._release(slot, keep)

    def share_own(self, slot: int, num_pages: int) -> list[int]:
        """The first `num_pages` own pages of a live slot become cached pages the slot shares (one reference
        each), extending its shared prefix: the cache adopted them while the slot keeps using them. Returns
        them."""
        self._check_slot(slot, (_LIVE,), "share_own")
        _check_count("num_pages", num_pages)
        start = self._slot_shared[slot]
        if start + num_pages > len(self._slot_pages[slot]):
            raise ValueError(f"share_own: slot {slot} has {self._num_own(slot)} own pages, asked {num_pages}")
        pages = self._slot_pages[slot][start : start + num_pages]
        for page in pages:
            self._cached[page] = 1
        self._slot_shared[slot] = start + num_pages
        return pages

    def uncache(self, pages: Sequence[int]) -> None:
        """Evict unreferenced cached pages back to the free list (all or nothing)."""
        for page in pages:
            refs = self._cached.get(page)
            if refs is None:
                raise ValueError(f"uncache: page {page} is not cached")
            if refs:
                raise ValueError(f"uncache: page {page} is shared by {refs} slots (in use)")
        if len(set(pages)) != len(pages):
            raise ValueError(f"uncache: pages repeat: {list(pages)}")
        for page in pages:
            del self._cached[page]
            self._free_pages.append(page)
        self._num_evictable -= len(pages)

    def free_deferred(self, slot: int, writer: str) -> None:
        """The request is finished but `writer` may still write its pages: park them until it is done or dead."""
        if not isinstance(writer, str) or not writer:
            raise ValueError(f"writer must be a non-empty str, got {writer!r}")
        self._check_slot(slot, (_LIVE,), "free_deferred")
        self._slot_state[slot] = _PARKED
        self._parked_writer[slot] = writer
        self._num_parked_pages += self._num_own(slot)

    def writer_done(self, writer: str, to_cache: Mapping[int, Collection[int]] | None = None) -> int:
        """`writer` will never write again (it finished, or died): release every slot parked for it, handing
        each slot's own pages in `to_cache[slot]` to the cache as in `free`. Returns the own pages released."""
        slots = [s for s, w in self._parked_writer.items() if w == writer]
        stray = set(to_cache or {}) - set(slots)
        if stray:
            raise ValueError(f"writer_done: slots {sorted(stray)[:8]} are not parked for writer {writer!r}")
        released = 0
        for slot in slots:
            keep = set((to_cache or {}).get(slot, ()))
            own = self._slot_pages[slot][self._slot_shared[slot] :]
            if keep - set(own):
                raise ValueError(f"writer_done: to_cache pages {sorted(keep - set(own))[:8]} are not own pages of "
                                 f"slot {slot}")
            released += len(own)
            del self._parked_writer[slot]
            self._num_parked_pages -= len(own)
            self._release(slot, keep)
        return released

    def parked_for(self, writer: str) -> list[int]:
        """Slots parked until `writer` is done."""
        return [s for s, w in self._parked_writer.items() if w == writer]

    # --- integrity ------------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Every page is free, cached, or owned by exactly one live or parked slot; the reference counts of
        cached pages match the rows that share them; tables match; the attached cache's tree agrees. Raises
        AssertionError."""
        owner: dict[int, str] = {}

        def claim(page: int, who: str) -> None:
            assert 0 <= page < self.num_pages, f"page {page} ({who}) is out of range [0, {self.num_pages})"
            assert page not in owner, f"page {page} is held twice: by {owner[page]} and by {who}"
            owner[page] = who

        for page in self._free_pages:
            claim(page, "the free list")
        for page in self._cached:
            claim(page, "the prefix cache")
        refs: dict[int, int] = dict.fromkeys(self._cached, 0)
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
            n_shared = self._slot_shared[slot]
            assert n_shared <= len(pages) and (state != _FREE or n_shared == 0), (
                f"slot {slot} claims {n_shared} shared pages of {len(pages)}"
            )
            for page in pages[:n_shared]:
                assert page in refs, f"shared page {page} of slot {slot} is not cached"
                refs[page] += 1
            for page in pages[n_shared:]:
                claim(page, f"{_STATE_NAMES[state]} slot {slot}")
            if state == _PARKED:
                parked_pages += len(pages) - n_shared
            expected = pages + [-1] * (self.max_pages_per_request - len(pages))
            assert table[slot] == expected, f"req_to_page row {slot} is {table[slot]}, expected {expected}"
        assert parked_pages == self._num_parked_pages, (
            f"parked page count {self._num_parked_pages} != {parked_pages} pages in parked slots"
        )
        bad_refs = {p: (self._cached[p], n) for p, n in refs.items() if self._cached[p] != n}
        assert not bad_refs, (
            f"cached page refcounts (counted, rows sharing) disagree: {dict(list(bad_refs.items())[:8])}"
        )
        unref = sum(1 for n in refs.values() if n == 0)
        assert unref == self._num_evictable, f"evictable count {self._num_evictable} != {unref} unreferenced"
        missing = self.num_pages - len(owner)
        assert missing == 0, f"{missing} pages leaked (neither free nor held), e.g. " + str(
            sorted(set(range(self.num_pages)) - set(owner))[:8]
        )
        if self._cache is not None:
            self._cache.check_tree()

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

    def check_capacity(self, total: int, op: str) -> None:
        """Raise OutOfPagesError if a slot of `total` pages can never exist (a caller bug, not a shortage)."""
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
            # from pinned memory, queued on the stream: a pageable copy would wait for the step in flight
            cuda = self.device.type == "cuda"
            src = torch.tensor(pages, dtype=torch.int32, pin_memory=cuda)
            self.req_to_page[slot, start : start + len(pages)].copy_(src, non_blocking=cuda)

    def _num_own(self, slot: int) -> int:
        return len(self._slot_pages[slot]) - self._slot_shared[slot]

    def _add_ref(self, page: int, delta: int) -> None:
        old = self._cached[page]
        new = self._cached[page] = old + delta
        assert new >= 0, f"cached page {page} refcount below zero"
        self._num_evictable += (new == 0) - (old == 0)

    def _release(self, slot: int, to_cache: Collection[int] = ()) -> None:
        if self._cache is not None:
            self._cache.slot_released(slot)  # the cache drops this slot's lock before its pages move
        pages, n_shared = self._slot_pages[slot], self._slot_shared[slot]
        for page in pages[:n_shared]:
            self._add_ref(page, -1)
        own = pages[n_shared:]
        for page in own:
            if page in to_cache:
                self._cached[page] = 0
        self._num_evictable += sum(1 for p in own if p in to_cache)
        if pages:
            self.req_to_page[slot, : len(pages)] = -1
            self._free_pages.extend(reversed([p for p in own if p not in to_cache]))
        self._slot_pages[slot] = []
        self._slot_shared[slot] = 0
        self._slot_state[slot] = _FREE
        self._free_slots.append(slot)
