"""Reference solutions to the exercises of lesson 02 (`course/02_paged_attention.ipynb`).

Each function (or class) has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson02`
holds the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove
every checker rejects them (and they are the lesson's "common pitfalls", written as code).

The two Triton exercises define kernels at import: on a machine without a GPU, set TRITON_INTERPRET=1
before importing triton (and this file), as the notebook's first cell does.
"""

from __future__ import annotations

import heapq
import math

import torch
import triton
import triton.language as tl


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


def cow_append(allocator, block_table, num_tokens, block_size):
    """Reserve the slot of token `num_tokens` of a sequence; `block_table` is changed in place.

    Returns (slot, copy): copy is None, or (src, dst) when the shared, partly filled last block had to be
    copied first. A full last block needs a new block, never a copy; a block held alone is written in place.
    """
    offset = num_tokens % block_size
    if offset == 0:  # no block yet, or the last one is full
        block_table.append(allocator.allocate())
        return block_table[-1] * block_size, None
    last = block_table[-1]
    if allocator.refcount(last) > 1:  # others see this block: give this sequence its own copy
        new = allocator.allocate()
        allocator.free(last)  # one reference less on the shared block; the others keep it
        block_table[-1] = new
        return new * block_size + offset, (last, new)
    return last * block_size + offset, None


@triton.jit
def online_softmax_kernel(Q, K, V, BlockTables, ContextLens, Out, scale,
                          stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                          GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)  # the sequence
    h = tl.program_id(1)  # the query head
    kv_head = h // GROUP
    n = tl.load(ContextLens + b)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d)  # [D]
    m_i = tl.full([], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([], tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([D], tl.float32)  # running sum of exp(s - m_i) * v
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        block = tl.load(BlockTables + b * stride_bt + offs_n // PAGE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_kt + kv_head * stride_kh
        k = tl.load(K + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp(s - m_new)
        v = tl.load(V + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(Out + b * stride_qb + h * stride_qh + offs_d, acc / l_i)


def online_softmax_decode(q, k_cache, v_cache, block_tables, context_lens):
    """One program per (sequence, query head), online softmax over 16-token tiles. q [B, Hq, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    out = torch.empty_like(q)
    online_softmax_kernel[(B, Hq)](
        q, k_cache, v_cache, block_tables, context_lens, out, D ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=Hq // k_cache.shape[2], PAGE=k_cache.shape[1], D=D, BLOCK_N=16,
    )
    return out


@triton.jit
def grouped_kernel(Q, K, V, BlockTables, ContextLens, Out, scale,
                   stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    b = tl.program_id(0)  # the sequence
    kv_head = tl.program_id(1)  # the KV head: this program computes its GROUP query heads
    n = tl.load(ContextLens + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kv_head * GROUP + offs_g  # the query heads that share this KV head
    g_mask = offs_g < GROUP  # rows past GROUP only pad the tile to tl.dot's minimum of 16
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        block = tl.load(BlockTables + b * stride_bt + offs_n // PAGE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_kt + kv_head * stride_kh
        k = tl.load(K + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # read once, used GROUP times
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(V + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(Out + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], acc / l_i[:, None],
             mask=g_mask[:, None])


def grouped_decode(q, k_cache, v_cache, block_tables, context_lens):
    """One program per (sequence, KV head), its query heads as one [GROUP, D] tile. q [B, Hq, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    grouped_kernel[(B, Hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out, D ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=Hq // Hkv, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hkv)), PAGE=k_cache.shape[1], D=D, BLOCK_N=16,
    )
    return out


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


def merge_partials_naive_float64(outs, lses):
    """The softmax written out, in float64: survives lse ~ 100, overflows (or underflows to 0/0) at +-1000."""
    w = torch.exp(lses.double())
    return ((w / w.sum(dim=0))[..., None] * outs.double()).sum(dim=0).to(outs.dtype)


def cow_append_no_copy(allocator, block_table, num_tokens, block_size):
    """Writes into the last block even while other sequences share it: they see this sequence's token."""
    if num_tokens % block_size == 0:
        block_table.append(allocator.allocate())
    return block_table[-1] * block_size + num_tokens % block_size, None


def cow_append_keeps_reference(allocator, block_table, num_tokens, block_size):
    """Copies, but never drops its reference to the shared block: the block can never be freed (a leak)."""
    offset = num_tokens % block_size
    if offset == 0:
        block_table.append(allocator.allocate())
        return block_table[-1] * block_size, None
    last = block_table[-1]
    if allocator.refcount(last) > 1:
        new = allocator.allocate()
        block_table[-1] = new
        return new * block_size + offset, (last, new)
    return last * block_size + offset, None


def cow_append_copies_full_block(allocator, block_table, num_tokens, block_size):
    """Copies a shared last block even when it is full, although the token goes into a new block anyway."""
    last = block_table[-1] if block_table else None
    if last is not None and allocator.refcount(last) > 1 and num_tokens % block_size == 0:
        new = allocator.allocate()
        allocator.free(last)
        block_table[-1] = new
        slot, _ = cow_append(allocator, block_table, num_tokens, block_size)
        return slot, (last, new)
    return cow_append(allocator, block_table, num_tokens, block_size)


def cow_append_copy_reversed(allocator, block_table, num_tokens, block_size):
    """Returns the copy as (dst, src): the caller copies the empty new block over... nothing useful."""
    slot, copy = cow_append(allocator, block_table, num_tokens, block_size)
    return slot, None if copy is None else (copy[1], copy[0])


@triton.jit
def _mistaken_online_kernel(Q, K, V, BlockTables, ContextLens, Out, scale,
                            stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                            GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                            MISTAKE: tl.constexpr):
    """online_softmax_kernel with one mistake: 1 no rescaling, 2 no -inf for masked scores, 3 no block table."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // GROUP
    n = tl.load(ContextLens + b)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        if MISTAKE == 3:  # the logical block index used as if it were the physical one
            block = offs_n // PAGE
        else:
            block = tl.load(BlockTables + b * stride_bt + offs_n // PAGE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_kt + kv_head * stride_kh
        k = tl.load(K + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.sum(k * q[None, :], axis=1) * scale
        if MISTAKE != 2:
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        if MISTAKE == 1:
            alpha = 1.0
        p = tl.exp(s - m_new)
        v = tl.load(V + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(Out + b * stride_qb + h * stride_qh + offs_d, acc / l_i)


def _mistaken_online(mistake, name):
    def launch(q, k_cache, v_cache, block_tables, context_lens):
        B, Hq, D = q.shape
        out = torch.empty_like(q)
        _mistaken_online_kernel[(B, Hq)](
            q, k_cache, v_cache, block_tables, context_lens, out, D ** -0.5,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            GROUP=Hq // k_cache.shape[2], PAGE=k_cache.shape[1], D=D, BLOCK_N=16, MISTAKE=mistake,
        )
        return out

    launch.__name__ = launch.__qualname__ = name
    return launch


online_softmax_decode_no_rescale = _mistaken_online(1, "online_softmax_decode_no_rescale")
online_softmax_decode_no_rescale.__doc__ = "Forgets to rescale l and acc by exp(m_old - m_new) when the max grows."
online_softmax_decode_unmasked_scores = _mistaken_online(2, "online_softmax_decode_unmasked_scores")
online_softmax_decode_unmasked_scores.__doc__ = "Masks the loads but not the scores: past the end, s = 0 still counts."
online_softmax_decode_no_block_table = _mistaken_online(3, "online_softmax_decode_no_block_table")
online_softmax_decode_no_block_table.__doc__ = "Reads logical block i from physical block i, ignoring the block table."


@triton.jit
def _mistaken_grouped_kernel(Q, K, V, BlockTables, ContextLens, Out, scale,
                             stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                             BLOCK_N: tl.constexpr, NUM_KV: tl.constexpr, MISTAKE: tl.constexpr):
    """grouped_kernel with one mistake: 1 heads h % Hkv, 2 only the first head of the group, 3 no -inf mask."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    n = tl.load(ContextLens + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    if MISTAKE == 1:  # query heads kv_head, kv_head + Hkv, ... (repeat instead of repeat_interleave)
        heads = kv_head + offs_g * NUM_KV
    else:
        heads = kv_head * GROUP + offs_g
    g_mask = offs_g < (1 if MISTAKE == 2 else GROUP)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        block = tl.load(BlockTables + b * stride_bt + offs_n // PAGE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_kt + kv_head * stride_kh
        k = tl.load(K + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if MISTAKE != 3:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(V + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(Out + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], acc / l_i[:, None],
             mask=g_mask[:, None])


def _mistaken_grouped(mistake, name):
    def launch(q, k_cache, v_cache, block_tables, context_lens):
        B, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        out = torch.zeros_like(q)
        _mistaken_grouped_kernel[(B, Hkv)](
            q, k_cache, v_cache, block_tables, context_lens, out, D ** -0.5,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            GROUP=Hq // Hkv, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hkv)), PAGE=k_cache.shape[1], D=D,
            BLOCK_N=16, NUM_KV=Hkv, MISTAKE=mistake,
        )
        return out

    launch.__name__ = launch.__qualname__ = name
    return launch


grouped_decode_modulo = _mistaken_grouped(1, "grouped_decode_modulo")
grouped_decode_modulo.__doc__ = "Gives KV head j the query heads j, j + Hkv, ... (h % Hkv) instead of a consecutive run."
grouped_decode_first_head_only = _mistaken_grouped(2, "grouped_decode_first_head_only")
grouped_decode_first_head_only.__doc__ = "Computes and stores only the first query head of each group."
grouped_decode_unmasked_scores = _mistaken_grouped(3, "grouped_decode_unmasked_scores")
grouped_decode_unmasked_scores.__doc__ = "Masks the loads but not the scores: positions past the end count with s = 0."


MISTAKES = {
    "slot_mapping": [slot_mapping_no_scale, slot_mapping_ignores_table, slot_mapping_from_zero],
    "RefCountedAllocator": [AllocatorIgnoresRefcount, AllocatorForkCopiesNothing, AllocatorNeverReuses,
                            AllocatorSilentDoubleFree],
    "paged_attention_one": [paged_attention_whole_blocks, paged_attention_gqa_modulo, paged_attention_no_scale],
    "merge_partials": [merge_partials_mean, merge_partials_no_max, merge_partials_linear, merge_partials_naive_float64],
    "cow_append": [cow_append_no_copy, cow_append_keeps_reference, cow_append_copies_full_block,
                   cow_append_copy_reversed],
    "online_softmax_decode": [online_softmax_decode_no_rescale, online_softmax_decode_unmasked_scores,
                              online_softmax_decode_no_block_table],
    "grouped_decode": [grouped_decode_modulo, grouped_decode_first_head_only, grouped_decode_unmasked_scores],
}
