"""The block allocator: a pool of fixed-size KV blocks handed out by id, with reference counts.

Paged attention (vLLM) cuts the KV cache into blocks of `block_size` tokens. A sequence owns a list
of block ids (its block table) instead of one contiguous region, so memory is taken one block at a
time, as the sequence grows, and given back the moment it finishes. This module is only the
bookkeeping: which block ids are free, and how many block tables point at each used one. It never
touches a tensor, so it is the same on CPU and GPU.

Reference counts are what make sharing possible: `fork` (beam search, parallel sampling, a shared
prompt) points a second block table at the same blocks and increments their counts; `free` decrements,
and a block returns to the free list only when its count reaches zero.

    alloc = BlockAllocator(8)
    a, b = alloc.allocate_many(2)     # [0, 1]
    alloc.incref(a)                   # a second sequence shares block a
    alloc.free(a); alloc.free(a)      # freed twice: back on the free list
    alloc.num_free                    # 7

Prefix caching (lesson 04) adds one more kind of holder. A prefix cache `hold`s one reference to each
block it caches, so a block that a sequence and the cache share has refcount >= 2 and copy-on-write
protects it like any shared block. A cached block that only the cache holds is *evictable*: it counts
as free (`num_free`), and an allocation that finds the free list short asks the cache's `evictor` to
`release` some first, so the pool is never short because of blocks nobody uses.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import islice

from ..kv_cache import CacheFullError


class OutOfBlocksError(CacheFullError):
    """Raised when an allocation needs more free KV blocks than the pool has.

    A subclass of `CacheFullError`, so code written for the contiguous caches catches it too. The
    allocation that raised took nothing: `num_needed` and `num_free` say by how much it missed.
    """

    def __init__(self, num_needed: int, num_free: int, num_blocks: int, what: str = "") -> None:
        self.num_needed, self.num_free, self.num_blocks = num_needed, num_free, num_blocks
        detail = f" for {what}" if what else ""
        super().__init__(
            f"out of KV blocks: {num_needed} needed{detail} but only {num_free} of {num_blocks} are free "
            f"(free finished sequences, preempt one, or build the cache with more num_blocks)"
        )


class BlockAllocator:
    """Free list plus reference counts over block ids 0 .. num_blocks-1.

    The free list is a min-heap, so the lowest free id is handed out first: deterministic, and the
    pictures in the lesson stay readable. Every method checks its argument: freeing a free block or
    sharing one nobody holds is a bug in the caller, and says so instead of corrupting the pool.
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._refcount = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks))  # sorted, so already a valid heap
        self._cached = [False] * num_blocks  # a prefix cache holds one reference to the block
        # Cached blocks that only the cache holds, in the order they became so (least recently used first).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Set by a prefix cache: evictor(n) releases cached blocks until n more are on the free list
        # (or none is evictable any more).
        self.evictor: Callable[[int], object] | None = None

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        """Cached blocks that no sequence holds (counted in `num_free`)."""
        return len(self._evictable)

    def evictable_blocks(self, limit: int | None = None) -> list[int]:
        """The evictable cached blocks (the first `limit` of them), least recently released first."""
        return list(islice(self._evictable, limit))

    def is_cached(self, block: int) -> bool:
        self._check_id(block)
        return self._cached[block]

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._refcount[block]

    def is_shared(self, block: int) -> bool:
        return self.refcount(block) > 1

    def free_blocks(self) -> list[int]:
        """The block ids on the free list (evictable cached blocks not included), lowest first."""
        return sorted(self._free)

    # --- allocation ---------------------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self) -> int:
        """One free block, its refcount set to 1. Raises OutOfBlocksError when none is free."""
        return self.allocate_many(1)[0]

    def allocate_many(self, n: int, what: str = "") -> list[int]:
        """`n` free blocks at once, or none: the check comes before any block is taken."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"cannot allocate {n!r} blocks")
        if n > self.num_free:  # checked first: a failed allocation evicts nothing either
            raise OutOfBlocksError(n, self.num_free, self.num_blocks, what)
        if n > len(self._free) and self.evictor is not None:
            self.evictor(n - len(self._free))  # cached blocks nobody uses make room
        if n > len(self._free):
            raise RuntimeError(f"the prefix cache's evictor left {len(self._free)} blocks free, {n} were needed")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def incref(self, block: int) -> None:
        """One more block table points at `block` (it must already be in use)."""
        self._check_used(block, "share")
        self._take(block)

    def fork(self, blocks: Iterable[int]) -> list[int]:
        """Share every block of a block table with a new owner; returns the same ids as a new list."""
        blocks = list(blocks)
        for b in blocks:
            self._check_used(b, "share")
        for b in blocks:
            self._take(b)
        return blocks

    def free(self, block: int) -> bool:
        """Drop one reference to `block`; True when that was the last one and it is free again."""
        self._check_used(block, "free")
        if self._cached[block] and self._refcount[block] == 1:
            raise ValueError(f"cannot free block {block}: only the prefix cache holds it (double free or stale "
                             "block table); the cache gives it back with release()")
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            heapq.heappush(self._free, block)
            return True
        if self._cached[block] and self._refcount[block] == 1:
            self._evictable[block] = None  # the most recently released go last
        return False

    def free_many(self, blocks: Iterable[int]) -> int:
        """Drop one reference to each block; returns how many went back to the free list."""
        return sum(self.free(b) for b in blocks)

    def _take(self, block: int) -> None:
        self._refcount[block] += 1
        if self._cached[block] and self._refcount[block] == 2:
            del self._evictable[block]  # a sequence uses it again

    # --- the prefix cache's reference ------------------------------------------------------------
    def hold(self, block: int) -> None:
        """A prefix cache takes its one reference to a block that a sequence holds (its K/V are written)."""
        self._check_used(block, "cache")
        if self._cached[block]:
            raise ValueError(f"block {block} is cached already: a prefix cache holds one reference per block")
        self._cached[block] = True
        self._refcount[block] += 1

    def release(self, block: int) -> bool:
        """The prefix cache drops its reference (eviction); True when the block is free again."""
        self._check_id(block)
        if not self._cached[block]:
            raise ValueError(f"cannot release block {block}: the prefix cache does not hold it")
        self._cached[block] = False
        self._evictable.pop(block, None)
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            heapq.heappush(self._free, block)
            return True
        return False

    def reset(self) -> None:
        """Every block free again (the caller forgets every block table, and any prefix cache its index)."""
        self._refcount = [0] * self.num_blocks
        self._free = list(range(self.num_blocks))
        self._cached = [False] * self.num_blocks
        self._evictable.clear()

    # --- checks -------------------------------------------------------------------------------
    def check_consistent(self, tables: Iterable[Iterable[int]] | None = None) -> None:
        """Assert the pool's invariants; with `tables`, also that the refcounts count exactly them.

        Free blocks have refcount 0, used ones > 0, no id is free twice, the evictable blocks are exactly
        the cached ones only the cache holds; and, given every live block table (a prefix cache's blocks
        count as one more table), each block's refcount equals the number of tables that hold it.
        """
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for b, rc in enumerate(self._refcount):
            if (b in free) != (rc == 0) or rc < 0:
                raise AssertionError(f"block {b}: refcount {rc} but {'free' if b in free else 'in use'}")
            if self._cached[b] and rc == 0:
                raise AssertionError(f"block {b} is cached but free")
            if (b in self._evictable) != (self._cached[b] and rc == 1):
                raise AssertionError(f"block {b}: cached={self._cached[b]}, refcount {rc}, but "
                                     f"{'' if b in self._evictable else 'not '}evictable")
        if tables is not None:
            counts = [0] * self.num_blocks
            for table in tables:
                for b in table:
                    counts[b] += 1
            if counts != self._refcount:
                bad = [b for b in range(self.num_blocks) if counts[b] != self._refcount[b]]
                raise AssertionError(
                    f"refcounts do not match the block tables at blocks {bad[:10]}: "
                    f"refcount {[self._refcount[b] for b in bad[:10]]}, held {[counts[b] for b in bad[:10]]}"
                )

    def _check_id(self, block: int) -> None:
        if not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block!r} is not in 0..{self.num_blocks - 1}")

    def _check_used(self, block: int, action: str) -> None:
        self._check_id(block)
        if self._refcount[block] == 0:
            raise ValueError(f"cannot {action} block {block}: it is free (double free or stale block table)")

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, free={self.num_free})"
