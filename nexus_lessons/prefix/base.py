"""What every prefix cache does for the paged pool: index cached blocks by their tokens, hand them out,
and give them back when the pool needs room.

A prefix cache never owns memory of its own. It holds one reference (`BlockAllocator.hold`) to each
block it indexes, in the pool that `PagedKVCache` already has. So:

* a cached block that a sequence also uses has refcount >= 2, and copy-on-write copies it before the
  sequence writes into it: a cached block is never written in place;
* a cached block nobody else uses (refcount 1) is *evictable*: it counts as free, and the allocator
  calls `evict(n)` when its free list is short, so cached blocks only ever use memory nobody needs;
* evicting a block a sequence still holds frees nothing (the sequence's reference keeps it), so the
  cache can never take memory from a running sequence.

Subclasses implement `match`, `insert`, `evict`, `blocks` and `check_consistent`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence


class BasePrefixCache:
    """The binding to a block pool, shared by `PrefixCache` (hash-chained) and `RadixPrefixCache`."""

    def __init__(self) -> None:
        self.allocator = None
        self.block_size: int | None = None

    def bind(self, allocator, block_size: int) -> None:
        """Plug into a pool: `PagedKVCache` calls this. One prefix cache serves one pool."""
        if self.allocator is not None and self.allocator is not allocator:
            raise ValueError(f"this {type(self).__name__} already indexes another block pool; make a new one")
        if allocator.evictor is not None and getattr(allocator.evictor, "__self__", None) is not self:
            raise ValueError("this block pool already has a prefix cache")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator, self.block_size = allocator, block_size
        allocator.evictor = self.evict

    def _need_pool(self) -> None:
        if self.allocator is None:
            raise RuntimeError(f"this {type(self).__name__} is not plugged into a pool: pass it to "
                               "PagedKVCache(..., prefix_cache=it) or call bind(allocator, block_size)")

    # --- the interface --------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """The longest cached prefix of `token_ids`: (its blocks, its length in tokens).

        Takes no reference: the caller shares the blocks into a block table (refcount + 1) before the
        next allocation could evict them."""
        raise NotImplementedError

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache a sequence's tokens, held in `blocks` (its block table). Returns how many blocks the
        cache took a new reference to."""
        raise NotImplementedError

    def evict(self, num_blocks: int) -> int:
        """Release cached blocks, least recently used first, until `num_blocks` more are free or nothing
        evictable is left. Returns how many blocks went back to the free list."""
        raise NotImplementedError

    def blocks(self) -> list[int]:
        """Every block the cache holds a reference to (for consistency checks and pictures)."""
        raise NotImplementedError

    def check_consistent(self) -> None:
        """Assert the index's invariants (the allocator checks the references)."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------
    def clear(self) -> int:
        """Forget everything cached; blocks no sequence holds go back to the free list. Returns how many."""
        if self.allocator is None:
            return 0
        return self.evict(1 << 62)  # more than any pool: evict everything

    @property
    def num_cached_blocks(self) -> int:
        return len(self.blocks())


def check_token_ids(token_ids, what: str = "token_ids") -> list[int]:
    """A list of ints from a list, tuple or 1-D integer tensor; anything else is a clear error.
    (One pass in C: a scheduler calls this for every prompt, thousands of tokens long.)"""
    if hasattr(token_ids, "tolist") and hasattr(token_ids, "dim"):  # a torch tensor
        if token_ids.dim() != 1 or token_ids.is_floating_point():
            raise ValueError(f"{what} must be a 1-D integer tensor or a list of ints, got shape "
                             f"{tuple(token_ids.shape)} dtype {token_ids.dtype}")
        return token_ids.tolist()
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"{what} must be a list of token ids, got {type(token_ids).__name__}")
    try:
        return list(map(operator.index, token_ids))
    except TypeError:
        bad = next(t for t in token_ids if not hasattr(t, "__index__"))
        raise TypeError(f"{what} must hold ints, got {type(bad).__name__} {bad!r}") from None
