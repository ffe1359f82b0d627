"""RadixCache + PageAllocator: unit tests and a hypothesis state machine that simulates K/V contents per page,
so a wrongly shared page (cached K/V of other tokens) or a page freed while in use is caught, not just
miscounted."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from semipd_memory import OutOfPagesError, PageAllocator, RadixCache


def make(num_pages: int = 16, page_size: int = 4, max_requests: int = 4, enabled: bool = True) -> RadixCache:
    return RadixCache(PageAllocator(num_pages, page_size, max_requests, 8), enabled=enabled)


def finish(c: RadixCache, tokens: list[int]) -> tuple[int, int]:
    """Admit tokens, 'compute' them all and free the slot into the cache; returns (slot, cached tokens)."""
    got = c.alloc(tokens)
    assert got is not None
    c.free(got[0], tokens, len(tokens))
    return got


def test_hit_shares_full_pages_and_leaves_one_token() -> None:
    c = make()
    a = c.allocator
    s, cached = c.alloc(list(range(10)))  # type: ignore[misc]
    assert cached == 0 and a.pages(s) == [0, 1, 2]
    c.free(s, list(range(10)), 10)  # 2 full pages cached, the partial third one freed
    assert a.num_cached_pages == 2 and a.num_evictable_pages == 2 and a.num_used_pages == 0
    assert c.match(list(range(12))) == [0, 1]
    s, cached = c.alloc(list(range(8)) + [50, 51])  # type: ignore[misc]
    assert cached == 8 and a.pages(s)[:2] == [0, 1] and a.num_shared(s) == 2
    assert a.page_refs(0) == 1 and a.num_evictable_pages == 0 and a.num_used_pages == 3
    assert c.cached_prefix_tokens(list(range(8))) == 4  # what alloc will share, without locking anything
    s2, cached2 = c.alloc(list(range(8)))  # type: ignore[misc]
    assert cached2 == 4, "a fully cached prompt still computes its last page (logits to sample)"
    assert a.page_refs(0) == 2 and a.page_refs(1) == 1
    a.check_integrity()
    c.free(s2, list(range(8)), 8)  # its own page for tokens 4..7 duplicates cached page 1: freed
    c.free(s, list(range(8)) + [50, 51], 10)
    assert a.num_cached_pages == 2 and a.num_used_pages == 0 and c.hit_tokens == 12 and c.query_tokens == 28
    a.check_integrity()
    assert c.evict(100) == 2 and a.num_free_pages == a.num_pages
    a.check_integrity()


def test_publish_shares_a_live_prefix_and_skips_twins() -> None:
    c = make(num_pages=24, max_requests=6)
    a = c.allocator
    system = list(range(100, 112))  # 3 pages of a new shared prefix
    sa, _ = c.alloc(system + [1, 2])  # type: ignore[misc]
    twin, _ = c.alloc(system + [3])  # type: ignore[misc]  # admitted before anything was published
    assert c.publish(sa, system + [1, 2]) == 3  # the partial last page stays the slot's own
    assert a.num_shared(sa) == 3 and a.num_cached_pages == 3 and a.num_evictable_pages == 0
    assert [a.page_refs(p) for p in a.pages(sa)[:3]] == [1, 1, 1]
    assert c.publish(twin, system + [3]) == 0 and a.num_shared(twin) == 0  # tree holds other pages for them
    assert c.cached_prefix_tokens(system + [4, 5]) == 12
    sb, cached = c.alloc(system + [4, 5])  # type: ignore[misc]  # arrives later: served from the live prefix
    assert cached == 12 and a.pages(sb)[:3] == a.pages(sa)[:3] and a.page_refs(a.pages(sa)[0]) == 2
    assert c.evict(100) == 0, "published pages in use are not evictable"
    a.check_integrity()
    c.free(sa, system + [1, 2], 14)
    c.free(twin, system + [3], 13)  # its duplicate pages go back to the free list
    c.free(sb, system + [4, 5], 14)
    assert a.num_used_pages == 0 and a.num_cached_pages == 3 and a.num_evictable_pages == 3
    assert c.publish(c.alloc([7])[0], [7]) == 0  # type: ignore[index]  # nothing full to publish
    a.check_integrity()


def test_diverging_prompts_split_nodes_and_evict_lru_tail_first() -> None:
    c = make(num_pages=12)
    a = c.allocator
    base = list(range(100, 108))  # 2 pages
    finish(c, base + [1, 2, 3, 4, 9])  # caches 3 pages: base + [1, 2, 3, 4]
    finish(c, base + [5, 6, 7, 8, 9])  # shares base, adds [5, 6, 7, 8]: the first node splits
    a.check_integrity()
    assert a.num_cached_pages == 4
    older = c.match(base + [1, 2, 3, 4])
    newer = c.match(base + [5, 6, 7, 8])
    assert older[:2] == newer[:2] and len(older) == len(newer) == 3
    assert c.evict(1) == 1  # the least recently used leaf goes first
    assert c.match(base + [1, 2, 3, 4]) == older[:2] and c.match(base + [5, 6, 7, 8]) == newer
    assert c.evict(2) == 2  # then the newer leaf, then the shared base's tail
    assert c.match(base + [5, 6, 7, 8]) == newer[:1]
    a.check_integrity()


def test_eviction_never_takes_a_page_in_use_and_admission_evicts_when_dry() -> None:
    c = make(num_pages=6, page_size=2, max_requests=3)
    a = c.allocator
    finish(c, [1, 2, 3, 4, 5, 6, 7])  # 3 pages cached
    held, cached = c.alloc([1, 2, 3, 4, 9])  # type: ignore[misc]
    assert cached == 4 and a.num_free_pages == 2  # shares 2 cached pages, owns 1 page
    with pytest.raises(ValueError, match="in use"):
        a.uncache([a.pages(held)[0]])
    assert c.evict(10) == 1  # only the unshared leaf [5, 6] can go
    assert a.num_free_pages == 3 and a.num_cached_pages == 2
    assert c.alloc(list(range(20, 28))) is None  # needs 4 pages: 3 free + 0 evictable -> nothing changes
    assert a.num_cached_pages == 2 and a.num_free_pages == 3
    c.free(held, [1, 2, 3, 4, 9], 5)
    got = c.alloc(list(range(20, 30)))  # 5 pages: 4 free now + 2 evictable -> evicts one
    assert got is not None and got[1] == 0 and a.num_cached_pages == 1
    a.check_integrity()
    c.free(got[0])
    c.evict(10)
    assert a.num_free_pages == a.num_pages
    a.check_integrity()


def test_extend_evicts_only_when_that_makes_it_fit() -> None:
    c = make(num_pages=6, page_size=2, max_requests=3)
    a = c.allocator
    finish(c, [1, 2, 3, 4, 5])  # 2 pages cached, 4 free
    s, _ = c.alloc([7, 8])  # type: ignore[misc]
    assert c.alloc([9, 9]) is not None and a.num_free_pages == 2
    assert not c.extend(s, 5) and a.num_cached_pages == 2  # 2 free + 2 evictable < 5: the cache is kept
    assert c.extend(s, 3) and a.num_cached_pages == 1 and a.num_free_pages == 0
    a.check_integrity()


def test_parked_slot_keeps_its_prefix_locked_until_the_writer_is_done() -> None:
    c = make(num_pages=8, page_size=2)
    a = c.allocator
    finish(c, [1, 2, 3, 4, 5])
    s, cached = c.alloc([1, 2, 3, 4, 6])  # type: ignore[misc]
    assert cached == 4
    c.free_deferred(s, "prefill")  # aborted while the prefill worker still reads the prefix
    assert c.evict(10) == 0 and a.num_used_pages == 3
    a.check_integrity()
    assert c.writer_done("prefill") == 1  # its own page; the shared ones go back to the cache
    assert a.num_used_pages == 0 and a.num_evictable_pages == 2
    a.check_integrity()


def test_deferred_free_caches_the_written_pages_once_the_writer_is_done() -> None:
    """A request released while a step in flight still writes its pages: they join the cache only then."""
    c = make(num_pages=8, page_size=2)
    a = c.allocator
    s, _ = c.alloc([1, 2, 3, 4, 5])  # type: ignore[misc]
    c.free_deferred(s, "step-3", [1, 2, 3, 4, 5], 5)
    assert c.match([1, 2, 3, 4, 9]) == [] and a.num_parked_pages == 3  # not readable while being written
    assert c.writer_done("step-2") == 0 and a.num_parked_pages == 3
    assert c.writer_done("step-3") == 3
    assert len(c.match([1, 2, 3, 4, 9])) == 2 and a.num_evictable_pages == 2 and a.num_used_pages == 0
    a.check_integrity()
    with pytest.raises(ValueError, match="num_written"):
        s2, _ = c.alloc([7, 8, 9])  # type: ignore[misc]
        c.free_deferred(s2, "step-4", [7, 8], 3)


def test_disabled_cache_is_the_bare_allocator() -> None:
    c = make(enabled=False)
    a = c.allocator
    finish(c, list(range(12)))
    s, cached = c.alloc(list(range(12)))  # type: ignore[misc]
    assert cached == 0 and a.num_cached_pages == 0 and a.num_free_pages == a.num_pages - 3
    c.free(s, list(range(12)), 12)
    assert a.num_free_pages == a.num_pages
    a.check_integrity()


def test_misuse_raises_clear_errors() -> None:
    c = make()
    a = c.allocator
    with pytest.raises(ValueError, match="tokens must not be empty"):
        c.alloc([])
    with pytest.raises(OutOfPagesError, match="max_pages_per_request"):
        c.alloc(list(range(40)))
    s, _ = c.alloc([1, 2, 3])  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"num_written=4 is outside \[0, len\(tokens\)=3\]"):
        c.free(s, [1, 2, 3], 4)
    with pytest.raises(TypeError, match="num_written must be an int"):
        c.free(s, [1, 2, 3], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already has a prefix cache"):
        RadixCache(a)
    with pytest.raises(ValueError, match="shared page 5 is not a cached page"):
        a.alloc(1, shared=[5])
    with pytest.raises(ValueError, match="not cached"):
        a.uncache([a.pages(s)[0]])
    with pytest.raises(ValueError, match="not own pages of slot"):
        a.free(s, to_cache=[9])
    with pytest.raises(ValueError, match="page_refs: page 3 is not cached"):
        a.page_refs(3)


def test_integrity_detects_cache_corruption() -> None:
    c = make()
    a = c.allocator
    finish(c, list(range(9)))
    s, _ = c.alloc(list(range(9)))  # type: ignore[misc]
    a.check_integrity()
    node = next(iter(c._root.children.values()))
    node.lock_ref += 1
    with pytest.raises(AssertionError, match="lock_ref"):
        a.check_integrity()
    node.lock_ref -= 1
    a._cached[a.pages(s)[0]] += 1
    with pytest.raises(AssertionError, match="refcounts"):
        a.check_integrity()
    a._cached[a.pages(s)[0]] -= 1
    a.check_integrity()
    a._free_pages.append(node.pages[0])  # a cached page also on the free list
    with pytest.raises(AssertionError, match="held twice"):
        a.check_integrity()


BASES = [[7] * 8, [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9]]
prompts = st.builds(
    lambda base, k, tail: (base[:k] + tail) or [0],
    st.sampled_from(BASES), st.integers(0, 8), st.lists(st.integers(0, 1), max_size=5),
)


class CacheMachine(RuleBasedStateMachine):
    """Admit / compute / grow / finish / abort / park / evict interleavings. `kv[page]` is what was 'written'
    into each page position; a page the cache shares must hold exactly the K/V of the tokens it is shared
    for."""

    def __init__(self) -> None:
        super().__init__()
        self.c = RadixCache(PageAllocator(num_pages=20, page_size=2, max_requests=5, max_pages_per_request=9))
        self.a = self.c.allocator
        self.ps = 2
        self.kv: dict[int, list[int | None]] = {}
        self.live: dict[int, tuple[list[int], int]] = {}  # slot -> (tokens, tokens written)
        self.parked: dict[int, str] = {}
        self.seen: list[list[int]] = []

    def is_cached(self, page: int) -> bool:
        try:
            self.a.page_refs(page)
            return True
        except ValueError:
            return False

    def fits(self, tokens: list[int]) -> bool:
        shared = self.c.match(tokens[: (len(tokens) - 1) // self.ps * self.ps])
        need = self.a.pages_needed(len(tokens)) - len(shared)
        locked_here = sum(1 for p in shared if self.a.page_refs(p) == 0)
        room = self.a.num_free_pages + self.a.num_evictable_pages - locked_here
        return self.a.num_free_slots > 0 and need <= room

    @rule(tokens=prompts, compute_now=st.integers(0, 14))
    def admit(self, tokens: list[int], compute_now: int) -> None:
        if self.a.pages_needed(len(tokens)) > self.a.max_pages_per_request:
            return
        fits = self.fits(tokens)
        got = self.c.alloc(tokens)
        assert (got is not None) == fits
        if got is None:
            return
        slot, cached = got
        pages = self.a.pages(slot)
        assert cached % self.ps == 0 and cached < len(tokens) and self.a.num_shared(slot) == cached // self.ps
        for i, page in enumerate(pages[: cached // self.ps]):
            assert self.kv[page] == tokens[i * self.ps : (i + 1) * self.ps], "shared a page of other tokens"
        for page in pages[cached // self.ps :]:
            assert not self.is_cached(page)
            self.kv[page] = [None] * self.ps  # fresh page: stale contents are not K/V of these tokens
        self.live[slot] = (list(tokens), cached)
        self.seen.append(list(tokens))
        self._compute(slot, compute_now)

    @precondition(lambda self: bool(self.seen))
    @rule(data=st.data(), tail=st.lists(st.integers(0, 3), max_size=4), compute_now=st.integers(0, 14))
    def admit_sibling(self, data: st.DataObject, tail: list[int], compute_now: int) -> None:
        """A prompt that shares part of a recent one, so matches end inside nodes others hold (splits)."""
        base = data.draw(st.sampled_from(self.seen[-4:]))
        k = data.draw(st.integers(0, len(base)))
        self.admit((base[:k] + tail) or [0], compute_now)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), n=st.integers(1, 6))
    def compute(self, data: st.DataObject, n: int) -> None:
        self._compute(data.draw(st.sampled_from(sorted(self.live))), n)

    def _compute(self, slot: int, n: int) -> None:
        tokens, written = self.live[slot]
        pages = self.a.pages(slot)
        for pos in range(written, min(written + n, len(tokens))):
            page = pages[pos // self.ps]
            assert pos // self.ps >= self.a.num_shared(slot), "wrote a shared page"
            assert not self.is_cached(page), "wrote a cached page"
            self.kv[page][pos % self.ps] = tokens[pos]
        self.live[slot] = (tokens, min(written + n, len(tokens)))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        """A live slot shares its written full pages now (semi-PD: at prefill done), not at its end."""
        slot = data.draw(st.sampled_from(sorted(self.live)))
        tokens, written = self.live[slot]
        before = self.a.num_shared(slot)
        twin = len(self.c.match(tokens[: written // self.ps * self.ps])) > before
        got = self.c.publish(slot, tokens[:written])
        after = self.a.num_shared(slot)
        assert after == before + got
        assert got == (0 if twin else min(written // self.ps, len(self.a.pages(slot))) - before)
        pages = self.a.pages(slot)
        for i, page in enumerate(pages[:after]):
            assert self.kv[page] == tokens[i * self.ps : (i + 1) * self.ps], "published a page of other tokens"
        assert self.c.match(tokens[:written])[:after] == pages[:after], "a later request would not find it"

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def grow(self, data: st.DataObject, new: list[int]) -> None:
        """Decode appends tokens: the slot needs more pages (evicting cache if that makes them fit)."""
        slot = data.draw(st.sampled_from(sorted(self.live)))
        tokens, written = self.live[slot]
        missing = self.a.pages_needed(len(tokens) + len(new)) - len(self.a.pages(slot))
        if len(self.a.pages(slot)) + missing > self.a.max_pages_per_request:
            return
        room = self.a.num_free_pages + self.a.num_evictable_pages
        ok = self.c.extend(slot, max(missing, 0))
        assert ok == (missing <= room)
        if ok:
            for page in self.a.pages(slot)[len(self.a.pages(slot)) - max(missing, 0) :]:
                self.kv[page] = [None] * self.ps
            self.live[slot] = (tokens + new, written)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), how=st.sampled_from(["finish", "finish_all", "abort_unwritten", "park"]))
    def release(self, data: st.DataObject, how: str) -> None:
        slot = data.draw(st.sampled_from(sorted(self.live)))
        if how == "finish_all":
            self._compute(slot, 100)
        tokens, written = self.live.pop(slot)
        if how.startswith("finish"):
            self.c.free(slot, tokens, written)
        elif how == "abort_unwritten":
            self.c.free(slot)
        else:
            # parked while a writer works: its written pages (if any are said written) are cached when it is done
            writer = data.draw(st.sampled_from(["prefill", "standby"]))
            self.c.free_deferred(slot, writer, tokens, written if data.draw(st.booleans()) else 0)
            self.parked[slot] = writer

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def finish_all(self, data: st.DataObject) -> None:
        """A request computed to its end finishes (the common case: a rule of its own, drawn more often)."""
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self._compute(slot, 100)
        tokens, written = self.live.pop(slot)
        self.c.free(slot, tokens, written)

    @rule(writer=st.sampled_from(["prefill", "standby"]))
    def writer_done(self, writer: str) -> None:
        self.c.writer_done(writer)
        self.parked = {s: w for s, w in self.parked.items() if w != writer}

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        before = self.a.num_evictable_pages
        in_use = {p for s in list(self.live) + list(self.parked) for p in self.a.pages(s)}
        assert self.c.evict(n) == min(n, before)
        still = {p for s in list(self.live) + list(self.parked) for p in self.a.pages(s)}
        assert still == in_use and not in_use & set(self.a._free_pages), "evicted a page in use"

    @invariant()
    def consistent(self) -> None:
        self.a.check_integrity()
        a = self.a
        assert a.num_free_pages + a.num_used_pages + a.num_evictable_pages == a.num_pages
        for tokens in self.seen[-6:]:  # whatever the cache offers for a prompt is K/V of that prompt
            for i, page in enumerate(self.c.match(tokens)):
                assert self.kv[page] == tokens[i * self.ps : (i + 1) * self.ps]

    def teardown(self) -> None:
        for slot in list(self.live):
            self.c.free(slot)
        self.c.writer_done("prefill")
        self.c.writer_done("standby")
        self.a.check_integrity()
        assert self.a.num_used_pages == 0, "refcounts did not return to zero"
        assert self.a.num_free_pages + self.a.num_evictable_pages == self.a.num_pages
        self.c.evict(self.a.num_pages)
        assert self.a.num_free_pages == self.a.num_pages and self.a.num_cached_pages == 0
        self.a.check_integrity()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
