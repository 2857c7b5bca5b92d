"""Per-sequence block tables, slot mapping and copy-on-write, on top of a `BlockAllocator`.

A sequence's block table is the list of block ids that hold its tokens, in order: token `p` lives in
block `table[p // block_size]` at offset `p % block_size`, i.e. at *slot*
`table[p // block_size] * block_size + p % block_size` of the pool (the vLLM `slot_mapping`).

Copy-on-write. `fork(seq_id)` gives a new sequence the same block table and increments every
block's refcount: no K/V is copied. Full blocks are never written again, so they stay shared for as
long as both sequences live. The last block may be partly filled; the first sequence that writes into
it while it is shared gets a private copy first (`copy_blocks(src, dst)` is called, which copies the
K/V rows on the device), so the other sequence never sees the write.

This module holds no tensors; `PagedKVCache` supplies `copy_blocks`, and the lesson's pictures drive
it on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .block_allocator import BlockAllocator

CopyBlocks = Callable[[list[int], list[int]], None]


@dataclass
class Sequence:
    """One sequence's slots: `blocks` holds exactly ceil(num_tokens / block_size) block ids."""

    seq_id: int
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # slots reserved (written or about to be)


class BlockTables:
    """The block tables of every live sequence, sharing one allocator."""

    def __init__(self, allocator: BlockAllocator, block_size: int, copy_blocks: CopyBlocks | None = None) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator = allocator
        self.block_size = block_size
        self.copy_blocks = copy_blocks
        self.seqs: dict[int, Sequence] = {}
        self._next_id = 0
        self.num_copies = 0  # copy-on-write block copies made so far (for the lesson's counters)

    # --- sequences ----------------------------------------------------------------------------
    def add_sequence(self, shared_blocks: Seq[int] = (), num_tokens: int = 0) -> int:
        """A new sequence: empty, or starting with `num_tokens` tokens held in `shared_blocks` (a cached
        prefix, lesson 04: refcounts + 1, nothing copied; a partly filled last block is copied on write)."""
        shared_blocks = list(shared_blocks)
        if not isinstance(num_tokens, int) or num_tokens < 0 or len(shared_blocks) != _ceil_div(num_tokens, self.block_size):
            raise ValueError(f"{num_tokens!r} tokens need {_ceil_div(max(num_tokens, 0), self.block_size)} blocks of "
                             f"{self.block_size}; got {len(shared_blocks)}")
        blocks = self.allocator.fork(shared_blocks)
        seq_id = self._next_id
        self._next_id += 1
        self.seqs[seq_id] = Sequence(seq_id, blocks, num_tokens)
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block of `seq_id` (refcounts + 1, nothing copied)."""
        parent = self._get(seq_id)
        child = self.add_sequence()
        self.seqs[child].blocks = self.allocator.fork(parent.blocks)
        self.seqs[child].num_tokens = parent.num_tokens
        return child

    def free(self, seq_id: int) -> int:
        """Forget `seq_id`; returns how many of its blocks went back to the free list."""
        seq = self._get(seq_id)
        del self.seqs[seq_id]
        # Last block first: cached blocks become evictable in this order, so a cached prefix loses its
        # tail before its head (a block is only reachable through the blocks before it).
        return self.allocator.free_many(reversed(seq.blocks))

    def free_all(self) -> None:
        for seq_id in list(self.seqs):
            self.free(seq_id)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def seq_ids(self) -> list[int]:
        return list(self.seqs)

    def num_tokens(self, seq_id: int) -> int:
        return self._get(seq_id).num_tokens

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's block ids, in token order."""
        return list(self._get(seq_id).blocks)

    def slot(self, seq_id: int, position: int) -> int:
        """The pool slot of token `position` of the sequence."""
        seq = self._get(seq_id)
        if not 0 <= position < seq.num_tokens:
            raise IndexError(f"sequence {seq_id} has {seq.num_tokens} slots; no position {position}")
        return seq.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def slot_mapping(self, seq_id: int, start: int = 0, end: int | None = None) -> list[int]:
        """Slots of positions start..end-1 (default: all)."""
        end = self._get(seq_id).num_tokens if end is None else end
        return [self.slot(seq_id, p) for p in range(start, end)]

    # --- growing --------------------------------------------------------------------------------
    def blocks_needed(self, appends: Mapping[int, int]) -> int:
        """Exactly how many free blocks `append_slots_many(appends)` would take (new blocks + copies).

        A shared, partly filled last block costs one copy per sequence that writes into it, except
        that the last of its holders to write finds itself alone and writes in place.
        """
        bs = self.block_size
        needed = 0
        writers: dict[int, int] = {}  # shared partial block -> how many of its holders append to it
        for seq_id, n in appends.items():
            seq = self._get(seq_id)
            if n < 0:
                raise ValueError(f"cannot append {n} slots to sequence {seq_id}")
            if n == 0:
                continue
            needed += _ceil_div(seq.num_tokens + n, bs) - len(seq.blocks)
            if seq.num_tokens % bs and self.allocator.refcount(seq.blocks[-1]) > 1:
                writers[seq.blocks[-1]] = writers.get(seq.blocks[-1], 0) + 1
        for block, k in writers.items():
            needed += min(k, self.allocator.refcount(block) - 1)
        return needed

    def can_append(self, appends: Mapping[int, int]) -> bool:
        return self.blocks_needed(appends) <= self.allocator.num_free

    def append_slots(self, seq_id: int, n: int) -> list[int]:
        """Reserve `n` more slots for one sequence; returns their slot ids."""
        return self.append_slots_many({seq_id: n})[seq_id]

    def append_slots_many(self, appends: Mapping[int, int]) -> dict[int, list[int]]:
        """Reserve slots for several sequences at once, all or nothing.

        The blocks needed are counted first: if they are not free, OutOfBlocksError is raised and no
        table, refcount or free list has changed. Otherwise shared partial blocks are copied (one
        batched `copy_blocks` call, before anything is written into them) and new blocks appended.
        """
        appends = dict(appends)
        needed = self.blocks_needed(appends)
        if needed > self.allocator.num_free:
            what = f"{sum(appends.values())} new tokens in {len(appends)} sequence(s)"
            self.allocator.allocate_many(needed, what)  # raises OutOfBlocksError, takes nothing
        bs = self.block_size
        src: list[int] = []
        dst: list[int] = []
        out: dict[int, list[int]] = {}
        for seq_id, n in appends.items():
            seq = self.seqs[seq_id]
            start = seq.num_tokens
            if n and start % bs and self.allocator.refcount(seq.blocks[-1]) > 1:
                private = self.allocator.allocate()
                src.append(seq.blocks[-1])
                dst.append(private)
                self.allocator.free(seq.blocks[-1])  # drop our share; the others keep it
                seq.blocks[-1] = private
            grow = _ceil_div(start + n, bs) - len(seq.blocks)
            seq.blocks.extend(self.allocator.allocate_many(grow))
            seq.num_tokens = start + n
            out[seq_id] = [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
        if src:
            self.num_copies += len(src)
            if self.copy_blocks is not None:
                self.copy_blocks(src, dst)
        return out

    def truncate(self, seq_id: int, num_tokens: int) -> int:
        """Keep the first `num_tokens` slots; returns how many blocks went back to the free list.

        A block kept but now partly filled may still be shared: the next write into it copies it.
        """
        seq = self._get(seq_id)
        if not 0 <= num_tokens <= seq.num_tokens:
            raise ValueError(f"cannot truncate sequence {seq_id} to {num_tokens}: it has {seq.num_tokens} slots")
        keep = _ceil_div(num_tokens, self.block_size)
        dropped = seq.blocks[keep:]
        del seq.blocks[keep:]
        seq.num_tokens = num_tokens
        return self.allocator.free_many(reversed(dropped))

    # --- checks ---------------------------------------------------------------------------------
    def check_consistent(self, held_elsewhere: Iterable[Iterable[int]] = ()) -> None:
        """Assert every invariant: table lengths match token counts, refcounts count the tables (and the
        other holders, `held_elsewhere`: a prefix cache's blocks)."""
        for seq in self.seqs.values():
            if len(seq.blocks) != _ceil_div(seq.num_tokens, self.block_size):
                raise AssertionError(
                    f"sequence {seq.seq_id}: {seq.num_tokens} slots but {len(seq.blocks)} blocks"
                )
        self.allocator.check_consistent([*(seq.blocks for seq in self.seqs.values()), *held_elsewhere])

    def _get(self, seq_id: int) -> Sequence:
        try:
            return self.seqs[seq_id]
        except (KeyError, TypeError):
            raise KeyError(f"no live sequence {seq_id!r} (freed already, or never added)") from None

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self.seqs.values())


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
