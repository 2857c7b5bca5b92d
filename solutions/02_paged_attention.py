"""Reference solutions to the exercises of lesson 02 (`course/02_paged_attention.ipynb`).

Each function (or class) has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson02`
holds the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove
every checker rejects them (and they are the lesson's "common pitfalls", written as code).
"""

from __future__ import annotations

import heapq
import math

import torch


def slot_mapping(block_table, block_size, start, end):
    """Pool slots of positions start .. end-1 of a sequence: block_table[p // block_size] * block_size + p % block_size."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class RefCountedAllocator:
    """Block ids 0 .. num_blocks-1: a free list plus one reference count per block."""

    def __init__(self, num_blocks):
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks))  # a min-heap: the lowest free id goes first

    @property
    def num_free(self):
        return len(self._free)

    def refcount(self, block):
        return self._refs[block]

    def allocate(self):
        if not self._free:
            raise RuntimeError(f"out of KV blocks: all {self.num_blocks} are in use")
        block = heapq.heappop(self._free)
        self._refs[block] = 1
        return block

    def fork(self, blocks):
        for b in blocks:
            if self._refs[b] == 0:
                raise ValueError(f"cannot share block {b}: it is free")
        for b in blocks:
            self._refs[b] += 1
        return list(blocks)

    def free(self, block):
        if self._refs[block] == 0:
            raise ValueError(f"block {block} is already free (double free or stale block table)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            heapq.heappush(self._free, block)
            return True
        return False


def paged_attention_one(q, k_cache, v_cache, block_table, context_len):
    """One sequence's decode attention. q [Hq, D]; caches [num_blocks, block_size, Hkv, D] -> [Hq, D]."""
    block_size, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    pos = torch.arange(context_len)
    blocks = block_table[pos // block_size].long()  # only the entries this sequence uses
    k = k_cache[blocks, pos % block_size]  # [T, Hkv, D]: gathered, contiguous
    v = v_cache[blocks, pos % block_size]
    group = q.shape[0] // hkv
    k = k.repeat_interleave(group, dim=1)  # [T, Hq, D]: query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,thd->ht", q, k) / math.sqrt(d)
    return torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v)


def merge_partials(outs, lses):
    """outs [S, ..., D] (each split normalised by its own softmax sum), lses [S, ...] -> [..., D].

    Split s holds a share exp(lse_s) / sum_j exp(lse_j) of the whole softmax sum; subtract the max first.
    """
    m = lses.max(dim=0).values  # finite: at least one split is non-empty
    w = torch.exp(lses - m)  # an empty split: exp(-inf) = 0
    w = w / w.sum(dim=0)
    return (w[..., None] * outs).sum(dim=0)


# --- wrong answers the checkers must catch ----------------------------------------------------------------


def slot_mapping_no_scale(block_table, block_size, start, end):
    """Adds the offset to the block id, as if a block held one token."""
    return [block_table[p // block_size] + p % block_size for p in range(start, end)]


def slot_mapping_ignores_table(block_table, block_size, start, end):
    """Treats the pool as one contiguous buffer: correct only when the table is 0, 1, 2, ..."""
    return list(range(start, end))


def slot_mapping_from_zero(block_table, block_size, start, end):
    """Forgets `start`: the slots of the first end - start positions."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(end - start)]


class AllocatorIgnoresRefcount(RefCountedAllocator):
    """free() returns the block to the free list at once, even while another sequence still holds it."""

    def free(self, block):
        if block in self._free:
            raise ValueError(f"block {block} is already free")
        self._refs[block] = 0
        heapq.heappush(self._free, block)
        return True


class AllocatorForkCopiesNothing(RefCountedAllocator):
    """fork() hands back the ids without counting the new owner."""

    def fork(self, blocks):
        return list(blocks)


class AllocatorNeverReuses(RefCountedAllocator):
    """Hands out fresh ids forever: a pool that only grows (and eventually returns ids past its end)."""

    def __init__(self, num_blocks):
        super().__init__(num_blocks)
        self._next = 0

    def allocate(self):
        if not self._free:
            raise RuntimeError("out of blocks")
        block = self._next
        self._next += 1
        if block < self.num_blocks:
            self._free.remove(block)
            heapq.heapify(self._free)
            self._refs[block] = 1
        return block


class AllocatorSilentDoubleFree(RefCountedAllocator):
    """Accepts a double free: the refcount goes negative instead of raising."""

    def free(self, block):
        self._refs[block] -= 1
        if self._refs[block] == 0:
            heapq.heappush(self._free, block)
            return True
        return False


def paged_attention_whole_blocks(q, k_cache, v_cache, block_table, context_len):
    """Gathers every slot of every used block, including the unfilled tail of the last one."""
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-context_len // block_size)].long()
    padded = (-(-context_len // block_size)) * block_size
    return paged_attention_one(q, k_cache[blocks].reshape(1, padded, *k_cache.shape[2:]),
                               v_cache[blocks].reshape(1, padded, *v_cache.shape[2:]),
                               torch.zeros(1, dtype=torch.long), padded)


def paged_attention_gqa_modulo(q, k_cache, v_cache, block_table, context_len):
    """Maps query head h to KV head h % Hkv (repeat instead of repeat_interleave)."""
    block_size, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    pos = torch.arange(context_len)
    blocks = block_table[pos // block_size].long()
    group = q.shape[0] // hkv
    k = k_cache[blocks, pos % block_size].repeat(1, group, 1)
    v = v_cache[blocks, pos % block_size].repeat(1, group, 1)
    scores = torch.einsum("hd,thd->ht", q, k) / math.sqrt(d)
    return torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v)


def paged_attention_no_scale(q, k_cache, v_cache, block_table, context_len):
    """Forgets the 1/sqrt(D) on the scores."""
    return paged_attention_one(q * math.sqrt(q.shape[-1]), k_cache, v_cache, block_table, context_len)


def merge_partials_mean(outs, lses):
    """Averages the splits, as if each held the same share of the softmax."""
    return outs.mean(dim=0)


def merge_partials_no_max(outs, lses):
    """Right weights on paper, but exp(lse) overflows float32 once lse > 88."""
    w = torch.exp(lses)
    return (w[..., None] * outs).sum(dim=0) / w.sum(dim=0)[..., None]


def merge_partials_linear(outs, lses):
    """Weighs by lse itself instead of exp(lse)."""
    w = torch.where(torch.isinf(lses), torch.zeros_like(lses), lses)
    return (w[..., None] * outs).sum(dim=0) / w.sum(dim=0)[..., None]


MISTAKES = {
    "slot_mapping": [slot_mapping_no_scale, slot_mapping_ignores_table, slot_mapping_from_zero],
    "RefCountedAllocator": [AllocatorIgnoresRefcount, AllocatorForkCopiesNothing, AllocatorNeverReuses,
                            AllocatorSilentDoubleFree],
    "paged_attention_one": [paged_attention_whole_blocks, paged_attention_gqa_modulo, paged_attention_no_scale],
    "merge_partials": [merge_partials_mean, merge_partials_no_max, merge_partials_linear],
}
