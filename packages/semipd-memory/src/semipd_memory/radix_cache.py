"""RadixCache: a prefix cache over the allocator's pages, keyed by token ids at page granularity.

Only full pages are cached: a node's key is a whole number of pages of token ids and it holds one page id per
page, so a request can share a cached prefix page for page and never writes into a shared page (its own
tokens start on a page boundary). A request that shares a path *locks* it (`lock_ref` along the path to the
root); the allocator counts the same sharing per page, and `check_integrity` proves that both agree. Eviction
takes the least recently used unlocked leaves, tail pages first, and hands them back with
`PageAllocator.uncache`, which refuses a page any slot still shares.

The cache is also the one door through which a scheduler gets and returns pages (`alloc`, `extend`, `free`),
so that with `enabled=False` the same calls behave like the bare allocator.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from semipd_memory.page_allocator import PageAllocator


class _Node:
    __slots__ = ("alive", "children", "key", "last_access", "lock_ref", "pages", "parent")

    def __init__(self, key: list[int], pages: list[int], parent: _Node | None, last_access: int) -> None:
        self.key = key  # token ids, len(pages) * page_size of them
        self.pages = pages
        self.children: dict[tuple[int, ...], _Node] = {}  # by the token ids of the child's first page
        self.parent = parent
        self.lock_ref = 0  # slots whose shared prefix runs through this node
        self.last_access = last_access
        self.alive = True


class RadixCache:
    def __init__(self, allocator: PageAllocator, *, enabled: bool = True) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.enabled = enabled
        self._root = _Node([], [], None, 0)
        self._clock = 0
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, _Node]] = []  # (last_access, seq, leaf): lazy, checked when popped
        self._num_nodes = 0
        self._slot_node: dict[int, _Node] = {}  # slot -> deepest node of the prefix it shares (locked)
        self._deferred: dict[int, tuple[list[int], int]] = {}  # parked slot -> (tokens, num_written) to cache
        self.hit_tokens = 0  # prompt tokens served from the cache, over all admissions
        self.query_tokens = 0  # prompt tokens of all admissions
        allocator.attach_cache(self)

    # --- queries --------------------------------------------------------------------------------------------
    @property
    def num_cached_pages(self) -> int:
        return self.allocator.num_cached_pages

    @property
    def num_evictable_pages(self) -> int:
        return self.allocator.num_evictable_pages

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Pages of the longest cached full-page prefix of `tokens` (read-only: no lock, no LRU touch)."""
        ps, node, pages, i = self.page_size, self._root, [], 0
        while (i + 1) * ps <= len(tokens):
            child = node.children.get(tuple(tokens[i * ps : (i + 1) * ps]))
            if child is None:
                break
            k = self._common_pages(child, tokens, i, len(tokens) // ps - i)
            pages += child.pages[:k]
            i += k
            if k < len(child.pages):
                break
            node = child
        return pages

    def cached_prefix_tokens(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` an `alloc` now would share from the cache (read-only: no lock, no LRU touch)."""
        if not self.enabled or not tokens:
            return 0
        return len(self.match(tokens[: self._max_shared_pages(tokens) * self.page_size])) * self.page_size

    def _max_shared_pages(self, tokens: Sequence[int]) -> int:
        # full pages only, and at least one token left to compute (there must be logits to sample)
        return (len(tokens) - 1) // self.page_size

    # --- what a scheduler calls ---------------------------------------------------------------------------
    def alloc(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """A slot with pages for all of `tokens`, sharing the longest cached full-page prefix of tokens[:-1]
        (at least one token is left to compute, so there are logits to sample). Evicts LRU pages when the pool
        is short. Returns (slot, cached tokens), or None when slots or pages are short (nothing changed)."""
        if len(tokens) == 0:
            raise ValueError("alloc: tokens must not be empty")
        a, ps = self.allocator, self.page_size
        total = a.pages_needed(len(tokens))
        a.check_capacity(total, "alloc")
        if a.num_free_slots == 0:
            return None
        shared: list[int]
        node, shared = self._root, []
        if self.enabled:
            node, shared = self._lock_prefix(tokens, self._max_shared_pages(tokens))
        need = total - len(shared)
        if need > a.num_free_pages:
            # pages of the path just locked are unreferenced in the allocator but not evictable any more
            locked_here = sum(1 for p in shared if a.page_refs(p) == 0)
            if need > a.num_free_pages + a.num_evictable_pages - locked_here:
                self._unlock(node)
                return None
            self.evict(need - a.num_free_pages)
        slot = a.alloc(need, shared)
        assert slot is not None, "eviction left too few pages"
        if node is not self._root:
            self._slot_node[slot] = node
        self.hit_tokens += len(shared) * ps
        self.query_tokens += len(tokens)
        return slot, len(shared) * ps

    def extend(self, slot: int, num_pages: int) -> bool:
        """`PageAllocator.extend`, evicting first when that makes it fit; False (nothing changed) if not."""
        a = self.allocator
        short = num_pages - a.num_free_pages
        if 0 < short <= a.num_evictable_pages:
            self.evict(short)
        return a.extend(slot, num_pages)

    def free(self, slot: int, tokens: Sequence[int] = (), num_written: int = 0) -> None:
        """Release a live slot. Its first `num_written` tokens are `tokens[:num_written]` and their K/V is
        fully written: those full pages go into the cache (a page the cache already holds for the same tokens
        is freed as a duplicate), the rest back to the free list."""
        self._check_written(tokens, num_written)
        self.allocator.free(slot, self._adopt(slot, tokens, num_written))

    @staticmethod
    def _check_written(tokens: Sequence[int], num_written: int) -> None:
        if isinstance(num_written, bool) or not isinstance(num_written, int):
            raise TypeError(f"free: num_written must be an int, got {type(num_written).__name__}")
        if not 0 <= num_written <= len(tokens):
            raise ValueError(f"free: num_written={num_written} is outside [0, len(tokens)={len(tokens)}]")

    def _adopt(self, slot: int, tokens: Sequence[int], num_written: int) -> list[int]:
        """Insert the slot's written full pages into the tree; the pages the tree adopted."""
        if not self.enabled or num_written < self.page_size:
            return []
        row = self.allocator.pages(slot)
        n = min(num_written // self.page_size, len(row))
        return self._insert(tokens[: n * self.page_size], row[:n], self.allocator.num_shared(slot))

    def publish(self, slot: int, tokens: Sequence[int]) -> int:
        """A live slot whose first len(tokens) tokens are `tokens` with their K/V written (a finished prefill)
        shares its full pages with later requests now rather than when it ends: concurrent requests with the
        same new prefix then compute it once. The pages stay the slot's (it shares them, refcounted) and join
        its locked prefix. Nothing is published where the tree already holds other pages for these tokens (a
        twin published first: the slot keeps its duplicates until it ends). Returns the pages published."""
        if not self.enabled:
            return 0
        a, ps = self.allocator, self.page_size
        row, n_shared = a.pages(slot), a.num_shared(slot)
        n = min(len(tokens) // ps, len(row))
        if n <= n_shared or len(self.match(tokens[: n * ps])) != n_shared:
            return 0
        adopted, node = self._insert_path(tokens[: n * ps], row[:n], n_shared)
        assert adopted == row[n_shared:n], f"published {adopted}, expected {row[n_shared:n]}"
        a.share_own(slot, len(adopted))
        old = self._slot_node.pop(slot, None)
        self._lock_path(node)
        self._slot_node[slot] = node
        if old is not None:
            self._unlock(old)
        return len(adopted)

    def free_deferred(self, slot: int, writer: str, tokens: Sequence[int] = (), num_written: int = 0) -> None:
        """`free` for a slot that `writer` may still write (and read: its shared prefix stays locked): the slot
        is parked, and its written full pages go into the cache only once the writer is done."""
        self._check_written(tokens, num_written)
        self.allocator.free_deferred(slot, writer)
        self._deferred[slot] = (list(tokens[:num_written]), num_written)

    def writer_done(self, writer: str) -> int:
        """Release every slot parked for `writer` (it finished, or died), as `free` would have; returns the own
        pages released."""
        to_cache: dict[int, list[int]] = {}
        for slot in self.allocator.parked_for(writer):
            tokens, num_written = self._deferred.pop(slot, ([], 0))
            to_cache[slot] = self._adopt(slot, tokens, num_written)
        return self.allocator.writer_done(writer, to_cache)

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` unreferenced cached pages, least recently used leaves first; returns how
        many."""
        freed = 0
        while freed < num_pages and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if not self._evictable(node) or node.last_access != stamp:
                continue  # stale entry
            take = min(len(node.pages), num_pages - freed)
            self.allocator.uncache(node.pages[len(node.pages) - take :])
            freed += take
            if take == len(node.pages):
                self._remove(node)
            else:  # a shorter leaf keeps its place in the LRU order
                del node.pages[len(node.pages) - take :]
                del node.key[len(node.pages) * self.page_size :]
                self._push(node)
        return freed

    # --- allocator hooks ------------------------------------------------------------------------------------
    def slot_released(self, slot: int) -> None:
        node = self._slot_node.pop(slot, None)
        if node is not None:
            self._unlock(node)

    def check_tree(self) -> None:
        """The tree holds exactly the allocator's cached pages, once each; every lock_ref equals the slots
        that share the node and the allocator's refcount of its pages. Raises AssertionError."""
        a, ps = self.allocator, self.page_size
        expected_lock: dict[int, int] = {}
        for slot, node in self._slot_node.items():
            assert node.alive, f"slot {slot} locks an evicted node"
            path: list[int] = []
            n: _Node | None = node
            while n is not None and n is not self._root:
                expected_lock[id(n)] = expected_lock.get(id(n), 0) + 1
                path = n.pages + path
                n = n.parent
            assert n is self._root, f"slot {slot} locks a node cut off from the root"
            shared = a.pages(slot)[: a.num_shared(slot)]
            assert shared == path, f"slot {slot} shares pages {shared} but locks the path {path}"
        seen: set[int] = set()
        stack, count = [self._root], 0
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                count += 1
                assert child.alive and child.parent is node, "a child with a wrong parent link"
                assert child.pages and len(child.key) == len(child.pages) * ps, "a key is not whole pages"
                assert first == tuple(child.key[:ps]), "a child filed under the wrong first page"
                want = expected_lock.get(id(child), 0)
                assert child.lock_ref == want, (
                    f"node of pages {child.pages[:4]} has lock_ref {child.lock_ref}; {want} slots share it"
                )
                for page in child.pages:
                    assert page not in seen, f"page {page} is in the tree twice"
                    seen.add(page)
                    refs = a.page_refs(page)
                    assert refs == want, f"page {page}: {refs} refs, lock_ref {want}"
                stack.append(child)
        assert count == self._num_nodes, f"node count {self._num_nodes} != {count} nodes in the tree"
        assert a.num_cached_pages == len(seen), (
            f"allocator caches {a.num_cached_pages} pages, the tree holds {len(seen)}"
        )
        holders = set(a.live_slots()) | set(a.parked_slots())
        assert set(self._slot_node) <= holders, "a freed slot holds a lock"
        assert self.enabled or not seen, "a disabled cache holds pages"

    # --- internals ------------------------------------------------------------------------------------------
    def _common_pages(self, node: _Node, tokens: Sequence[int], start_page: int, limit: int) -> int:
        """Leading pages of `node` equal to tokens from page `start_page` on (the first is known to match)."""
        ps, k = self.page_size, 1
        limit = min(limit, len(node.pages))
        while k < limit:
            off = (start_page + k) * ps
            if node.key[k * ps : (k + 1) * ps] != list(tokens[off : off + ps]):
                break
            k += 1
        return k

    def _lock_prefix(self, tokens: Sequence[int], max_pages: int) -> tuple[_Node, list[int]]:
        """Match at most max_pages full pages, split the last node at the match end, touch + lock the path."""
        ps, node, pages, i = self.page_size, self._root, [], 0
        while i < max_pages:
            child = node.children.get(tuple(tokens[i * ps : (i + 1) * ps]))
            if child is None:
                break
            k = self._common_pages(child, tokens, i, max_pages - i)
            if k < len(child.pages):
                child = self._split(child, k)
            pages += child.pages
            i += k
            node = child
        self._lock_path(node)
        return node, pages

    def _lock_path(self, node: _Node) -> None:
        """Touch and lock node and its ancestors."""
        self._clock += 1
        n: _Node | None = node
        while n is not None and n is not self._root:
            n.last_access = self._clock
            n.lock_ref += 1
            n = n.parent

    def _unlock(self, node: _Node) -> None:
        n: _Node | None = node
        while n is not None and n is not self._root:
            n.lock_ref -= 1
            assert n.lock_ref >= 0, "lock_ref below zero"
            if n.lock_ref == 0:
                self._push(n)
            n = n.parent

    def _insert(self, tokens: Sequence[int], pages: list[int], num_shared: int) -> list[int]:
        """Add tokens -> pages along the tree; returns the pages the tree adopted (the rest of `pages` past
        `num_shared` are duplicates of pages it already holds)."""
        return self._insert_path(tokens, pages, num_shared)[0]

    def _insert_path(self, tokens: Sequence[int], pages: list[int], num_shared: int) -> tuple[list[int], _Node]:
        """`_insert`, also returning the node that ends the inserted path."""
        ps, node, i = self.page_size, self._root, 0
        self._clock += 1
        adopted: list[int] = []
        path: list[int] = []
        while i < len(pages):
            first = tuple(tokens[i * ps : (i + 1) * ps])
            child = node.children.get(first)
            if child is None:
                leaf = _Node(list(tokens[i * ps :]), pages[i:], node, self._clock)
                node.children[first] = leaf
                self._num_nodes += 1
                self._push(leaf)
                adopted = pages[i:]
                node = leaf
                break
            k = self._common_pages(child, tokens, i, len(pages) - i)
            if k < len(child.pages):
                child = self._split(child, k)
            path += child.pages
            child.last_access = self._clock
            self._push(child)
            node, i = child, i + k
        # the slot's locked shared prefix is on this path, page for page
        assert path[:num_shared] == pages[:num_shared], f"shared {pages[:num_shared]} not on path {path}"
        assert not set(adopted) & set(pages[:num_shared]), "the tree adopted a shared page"
        return adopted, node

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node` after k pages; the new upper part is returned, `node` keeps the rest (and its locks'
        handles stay valid: every slot locking node also locked what is now above it)."""
        ps, parent = self.page_size, node.parent
        assert parent is not None and 0 < k < len(node.pages)
        upper = _Node(node.key[: k * ps], node.pages[:k], parent, node.last_access)
        upper.lock_ref = node.lock_ref
        parent.children[tuple(node.key[:ps])] = upper
        node.key, node.pages, node.parent = node.key[k * ps :], node.pages[k:], upper
        upper.children[tuple(node.key[:ps])] = node
        self._num_nodes += 1
        return upper

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[tuple(node.key[:self.page_size])]
        node.alive = False
        self._num_nodes -= 1
        self._push(parent)

    def _evictable(self, node: _Node) -> bool:
        return node.alive and node is not self._root and not node.children and node.lock_ref == 0

    def _push(self, node: _Node) -> None:
        if not self._evictable(node):
            return
        heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
        if len(self._heap) > 4 * self._num_nodes + 64:  # drop stale entries
            live = {id(e[2]): e for e in self._heap if self._evictable(e[2]) and e[2].last_access == e[0]}
            self._heap = list(live.values())
            heapq.heapify(self._heap)
