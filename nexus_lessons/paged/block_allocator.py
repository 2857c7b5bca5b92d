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
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

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

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._refcount[block]

    def is_shared(self, block: int) -> bool:
        return self.refcount(block) > 1

    def free_blocks(self) -> list[int]:
        """The free block ids, in the order they would be handed out."""
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
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.num_blocks, what)
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def incref(self, block: int) -> None:
        """One more block table points at `block` (it must already be in use)."""
        self._check_used(block, "share")
        self._refcount[block] += 1

    def fork(self, blocks: Iterable[int]) -> list[int]:
        """Share every block of a block table with a new owner; returns the same ids as a new list."""
        blocks = list(blocks)
        for b in blocks:
            self._check_used(b, "share")
        for b in blocks:
            self._refcount[b] += 1
        return blocks

    def free(self, block: int) -> bool:
        """Drop one reference to `block`; True when that was the last one and it is free again."""
        self._check_used(block, "free")
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            heapq.heappush(self._free, block)
            return True
        return False

    def free_many(self, blocks: Iterable[int]) -> int:
        """Drop one reference to each block; returns how many went back to the free list."""
        return sum(self.free(b) for b in blocks)

    def reset(self) -> None:
        """Every block free again (the caller forgets every block table at the same time)."""
        self._refcount = [0] * self.num_blocks
        self._free = list(range(self.num_blocks))

    # --- checks -------------------------------------------------------------------------------
    def check_consistent(self, tables: Iterable[Iterable[int]] | None = None) -> None:
        """Assert the pool's invariants; with `tables`, also that the refcounts count exactly them.

        Free blocks have refcount 0, used ones > 0, no id is free twice; and, given every live block
        table, each block's refcount equals the number of tables that hold it (nothing leaked).
        """
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for b, rc in enumerate(self._refcount):
            if (b in free) != (rc == 0) or rc < 0:
                raise AssertionError(f"block {b}: refcount {rc} but {'free' if b in free else 'in use'}")
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
