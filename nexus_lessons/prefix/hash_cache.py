"""Hash-chained block caching, as vLLM does it: a full block is found by a hash of its tokens and of
every token before it.

Block i of a prompt covers tokens [i*b, (i+1)*b). Its key is

    h_i = hash(h_{i-1}, tokens of block i)        (h_{-1} = None)

so h_i stands for the whole prefix up to the end of block i, while hashing only b tokens. Matching a
prompt walks its full blocks in order and stops at the first key not in the table. Only full blocks
are cached: a partly filled block would still change, and its key with it.

Collisions. A hash names a prefix, it does not prove it: two different prefixes can share a key, and
a hit on the wrong one would attend over another prompt's K/V (a wrong answer, or a leak of another
user's prompt). vLLM makes collisions practically impossible with a cryptographic hash (SHA-256).
Here every cached block keeps its b token ids and a link to the cached block before it, and a hit counts
only if the tokens agree and the link points at the block just matched (so, by induction, the whole prefix
agrees): a collision costs a miss, never a wrong answer; the check costs b integer
comparisons per block, and the ids take 8b bytes beside a block's K/V (for Llama-3-8B, 2 MiB per
16-token block). Python's own tuple hash is then enough (and `hash_fn` lets a lesson force collisions).

Eviction. A cached block that no sequence holds waits in the allocator's evictable list in the order
it was released; a finished sequence releases its last block first, so a prefix loses its tail before
its head (vLLM frees in the same order). The least recently released leaves first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .base import BasePrefixCache, check_token_ids

HashFn = Callable[[int | None, tuple[int, ...]], int]


def block_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    """The key of a full block: its tokens chained to the key of the block before it. (Python hashes
    ints and tuples of ints the same in every process; None's hash can vary, hence the -1.)"""
    return hash((-1 if parent_hash is None else parent_hash, tokens))


@dataclass(eq=False)
class CachedBlock:
    """One cached full block: where it is, its key, and what it must hold for a hit to count."""

    block: int
    key: int
    parent: CachedBlock | None = field(repr=False)  # the cached block before it in the prefix (None: the first)
    tokens: tuple[int, ...]


class PrefixCache(BasePrefixCache):
    """vLLM-style automatic prefix caching: full blocks keyed by hash(parent key, block tokens)."""

    def __init__(self, hash_fn: HashFn = block_hash) -> None:
        super().__init__()
        self.hash_fn = hash_fn
        self._by_key: dict[int, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}

    def _chunks(self, token_ids: Sequence[int]):
        """(key, parent key, tokens) of each full block, in order."""
        b = self.block_size
        key = None
        for i in range(len(token_ids) // b):
            tokens = tuple(token_ids[i * b:(i + 1) * b])
            key = self.hash_fn(key, tokens)
            yield key, tokens

    def match(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        self._need_pool()
        token_ids = check_token_ids(token_ids)
        blocks: list[int] = []
        parent = None
        for key, tokens in self._chunks(token_ids):
            hit = self._by_key.get(key)
            # Compare, never trust the key: a collision must be a miss.
            if hit is None or hit.tokens != tokens or hit.parent is not parent:
                break
            blocks.append(hit.block)
            parent = hit
        return blocks, len(blocks) * self.block_size

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> int:
        self._need_pool()
        token_ids = check_token_ids(token_ids)
        blocks = list(blocks)
        if len(blocks) < len(token_ids) // self.block_size:
            raise ValueError(f"{len(token_ids)} tokens fill {len(token_ids) // self.block_size} blocks of "
                             f"{self.block_size}, but only {len(blocks)} blocks were given")
        taken = 0
        parent = None
        for i, (key, tokens) in enumerate(self._chunks(token_ids)):
            hit = self._by_key.get(key)
            if hit is not None:
                if hit.tokens != tokens or hit.parent is not parent:
                    break  # a collision: the key is taken by another prefix; the rest of the chain hangs off it
                parent = hit  # cached already: this very block, or the same tokens computed twice
                continue
            block = blocks[i]
            if self.allocator.is_cached(block):
                break  # cached under another prefix: cannot happen for blocks of one block table
            self.allocator.hold(block)
            entry = CachedBlock(block, key, parent, tokens)
            self._by_key[key] = self._by_block[block] = entry
            parent = entry
            taken += 1
        return taken

    def evict(self, num_blocks: int) -> int:
        if self.allocator is None:
            return 0
        freed = 0
        while freed < num_blocks:
            lru = self.allocator.evictable_blocks(1)  # least recently released first
            if not lru:
                break
            entry = self._by_block.pop(lru[0])
            del self._by_key[entry.key]
            freed += self.allocator.release(entry.block)
        return freed

    def clear(self) -> int:
        """Forget every cached block; those no sequence holds go back to the free list."""
        freed = 0
        for entry in list(self._by_block.values()):
            del self._by_block[entry.block], self._by_key[entry.key]
            freed += self.allocator.release(entry.block)
        return freed

    def blocks(self) -> list[int]:
        return list(self._by_block)

    @property
    def num_cached_tokens(self) -> int:
        return len(self._by_block) * (self.block_size or 0)

    def entries(self) -> list[CachedBlock]:
        """The cached blocks, in insertion order (for pictures)."""
        return list(self._by_block.values())

    def check_consistent(self) -> None:
        if len(self._by_key) != len(self._by_block):
            raise AssertionError(f"{len(self._by_key)} keys but {len(self._by_block)} blocks")
        for block, e in self._by_block.items():
            if self._by_key.get(e.key) is not e or e.block != block:
                raise AssertionError(f"block {block}: its entry is not under its key")
            if len(e.tokens) != self.block_size:
                raise AssertionError(f"block {block} caches {len(e.tokens)} tokens; only full blocks are cached")
            if not self.allocator.is_cached(block):
                raise AssertionError(f"block {block} is indexed but the allocator has no cache reference on it")
            if e.parent is not None and self._by_block.get(e.parent.block) is e.parent:
                if e.key != self.hash_fn(e.parent.key, e.tokens):
                    raise AssertionError(f"block {block}: its key does not chain to its parent's")
        cached = sum(self.allocator.is_cached(b) for b in range(self.allocator.num_blocks))
        if cached != len(self._by_block):
            raise AssertionError(f"the allocator has {cached} cache references but {len(self._by_block)} are indexed")

    def __repr__(self) -> str:
        return f"PrefixCache(blocks={len(self._by_block)}, block_size={self.block_size})"
