"""Checkers for lesson 02 (paged attention). Solutions: `solutions/02_paged_attention.py`.

1. `slot_mapping(block_table, block_size, start, end)`: the pool slots of positions start..end-1.
2. `RefCountedAllocator(num_blocks)`: a block allocator with reference counts, `allocate`, `fork`, `free`,
   `refcount` and `num_free`; checked on random sequences of operations against the block tables they imply.
3. `paged_attention_one(q, k_cache, v_cache, block_table, context_len)`: one sequence's decode attention
   over its paged K/V (GQA, a length that is not a multiple of the block size).
4. `merge_partials(outs, lses)`: the log-sum-exp merge of split-KV partial results.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

from . import (
    ExerciseFailure,
    awkward_length,
    checker,
    describe,
    expect,
    expect_close,
    expect_shape,
    random_signed,
)

__all__ = ["check_allocator", "check_merge_partials", "check_paged_attention_one", "check_slot_mapping"]


# --- 1. slot mapping ------------------------------------------------------------------------------------


def _slots(table: list[int], block_size: int, start: int, end: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _as_int_list(x, what: str) -> list[int]:
    if x is None:
        raise ExerciseFailure(f"{what} returned None; did you forget `return`?")
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.dim() != 1:
            raise ExerciseFailure(f"{what} should return a 1-D integer tensor or a list of ints, got {describe(x)}.")
        return [int(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)) and all(isinstance(v, Integral) and not isinstance(v, bool) for v in x):
        return [int(v) for v in x]
    raise ExerciseFailure(f"{what} should return a list of ints (or a 1-D integer tensor), got {describe(x)}.")


def _slot_hint(got: list[int], table: list[int], bs: int, start: int, end: int) -> str:
    """Which common mistake `got` equals, if any."""
    at = lambda i: table[i] if 0 <= i < len(table) else None  # noqa: E731
    wrong = [
        (lambda: [at(p // bs) + p % bs for p in range(start, end)],
         "It equals block id + offset: a slot counts tokens, so the block id must be multiplied by block_size."),
        (lambda: list(range(start, end)),
         "It equals the positions themselves: look each position's block up in the block table."),
        (lambda: _slots(table, bs, 0, end - start),
         f"It equals the slots of positions 0 .. {end - start - 1}: start at position {start}."),
        (lambda: _slots(table, bs, start, end + 1), "One slot too many: `end` is exclusive, like range(start, end)."),
        (lambda: [at(p % bs) * bs + p // bs for p in range(start, end)],
         "Block and offset are swapped: the block index is p // block_size, the offset p % block_size."),
    ]
    for make, hint in wrong:
        try:
            if got == make():
                return hint
        except (IndexError, TypeError):  # that mistake would have read past the table
            continue
    return ""


@checker("slot_mapping")
def check_slot_mapping(fn):
    """Random, shuffled block tables; block sizes from 1 to 16; ranges that start and end mid-block."""
    g = torch.Generator().manual_seed(201)
    cases = [([5, 2], 4, 0, 6), ([7], 16, 3, 4), ([3, 0, 9], 4, 5, 5)]  # the last one is empty
    for _ in range(14):
        bs = [1, 3, 4, 5, 8, 16][int(torch.randint(6, (1,), generator=g))]
        n = awkward_length(g, 1, 70)
        blocks = -(-n // bs)
        pool = blocks + int(torch.randint(0, 6, (1,), generator=g))
        table = torch.randperm(pool, generator=g)[:blocks].tolist()
        start = int(torch.randint(0, n, (1,), generator=g))
        end = int(torch.randint(start + 1, n + 1, (1,), generator=g))
        cases.append((table, bs, start, end))
    for table, bs, start, end in cases:
        call = f"slot_mapping({table}, block_size={bs}, start={start}, end={end})"
        want = _slots(table, bs, start, end)
        got = _as_int_list(fn(list(table), bs, start, end), call)
        if got != want:
            hint = _slot_hint(got, table, bs, start, end)
            raise ExerciseFailure(f"{call}: expected {want}, got {got}.{' ' + hint if hint else ''}")
    return f"{len(cases)} block tables (block sizes 1 to 16, ranges that start and end mid-block, one empty)"


# --- 2. a block allocator with reference counts ---------------------------------------------------------


def _expect_raises(call, what: str, why: str, kind: type[BaseException] = Exception) -> None:
    try:
        call()
    except NotImplementedError:
        raise
    except kind:
        return
    except Exception as e:
        raise ExerciseFailure(f"{what} raised {type(e).__name__}: {e}; expected a {kind.__name__}. {why}") from None
    raise ExerciseFailure(f"{what} returned normally; it must raise. {why}")


def _num_free(alloc, what: str) -> int:
    n = alloc.num_free
    n = n() if callable(n) else n
    if isinstance(n, torch.Tensor) and n.numel() == 1:
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, Integral):
        raise ExerciseFailure(f"num_free {what} should be an int, got {describe(n)}.")
    return int(n)


class _Model:
    """What the allocator's state must be: the block tables of the live sequences, nothing else."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.tables: dict[int, list[int]] = {}
        self.next_id = 0

    def held(self) -> list[int]:
        counts = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t:
                counts[b] += 1
        return counts


def _check_state(alloc, model: _Model, after: str) -> None:
    counts = model.held()
    free = sum(c == 0 for c in counts)
    got = _num_free(alloc, after)
    expect(got == free, f"after {after}, num_free is {got}; the live sequences hold {model.num_blocks - free} of "
                        f"{model.num_blocks} blocks, so {free} are free.")
    for b, c in enumerate(counts):
        rc = alloc.refcount(b)
        expect(rc == c, f"after {after}, refcount({b}) is {rc!r}, but {c} live block table(s) hold block {b}."
               + (" fork() must add one reference to every block it shares." if rc is not None and rc < c else ""))


def _allocate(alloc, model: _Model, what: str) -> int:
    counts = model.held()
    b = alloc.allocate()
    if isinstance(b, torch.Tensor) and b.numel() == 1:
        b = b.item()
    expect(isinstance(b, Integral) and not isinstance(b, bool), f"{what}: allocate() should return a block id (an int), "
                                                                f"got {describe(b)}.")
    b = int(b)
    expect(0 <= b < model.num_blocks, f"{what}: allocate() returned block {b}, outside 0..{model.num_blocks - 1}. "
                                      "Freed ids must be reused: the pool has a fixed size.")
    expect(counts[b] == 0, f"{what}: allocate() returned block {b}, which {counts[b]} live sequence(s) still hold: "
                           "a block may only be handed out again once its last reference is freed.")
    return b


def _free_sequence(alloc, model: _Model, seq: int, what: str) -> None:
    table = model.tables.pop(seq)
    counts = model.held()
    for b in table:
        counts_before = counts[b] + 1  # references to b before this free: the other tables' and this one
        last = alloc.free(b)
        expect(last is True or last is False or last in (0, 1),
               f"{what}: free({b}) should return True or False, got {describe(last)}.")
        expect(bool(last) == (counts_before == 1),
               f"{what}: free({b}) returned {bool(last)}, but block {b} had {counts_before} reference(s): free() "
               "returns True only when it drops the last one.")


@checker("RefCountedAllocator")
def check_allocator(fn):
    """Drives `RefCountedAllocator` with random sequences of new / grow / fork / free operations and
    compares num_free and every refcount with the block tables those operations imply; also checks that
    an empty pool raises and changes nothing, and that a double free raises ValueError."""
    g = torch.Generator().manual_seed(202)
    n_ops = 0

    def rand(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    for num_blocks in (5, 11, 23):
        alloc = fn(num_blocks)
        model = _Model(num_blocks)
        _check_state(alloc, model, f"RefCountedAllocator({num_blocks})")
        for step in range(60):
            op = rand(10)
            live = list(model.tables)
            free = sum(c == 0 for c in model.held())
            if op < 3 or not live:  # a new sequence with a short prompt
                n = 1 + rand(3)
                if n > free:
                    continue
                what = f"op {step} (new sequence of {n} block(s), pool of {num_blocks})"
                model.tables[model.next_id] = []
                for _ in range(n):
                    model.tables[model.next_id].append(_allocate(alloc, model, what))
                model.next_id += 1
            elif op < 6:  # grow a sequence by one block
                if not free:
                    continue
                seq = live[rand(len(live))]
                what = f"op {step} (a sequence grows by one block)"
                model.tables[seq].append(_allocate(alloc, model, what))
            elif op < 8:  # fork: a new sequence shares every block of an old one
                seq = live[rand(len(live))]
                what = f"op {step} (fork a sequence holding blocks {model.tables[seq]})"
                shared = alloc.fork(list(model.tables[seq]))
                got = None
                try:
                    got = [int(b) for b in shared]
                except TypeError:
                    pass
                expect(got == model.tables[seq], f"{what}: fork() should return the shared block ids "
                                                 f"{model.tables[seq]} (the new sequence's table), got {describe(shared)}.")
                model.tables[model.next_id] = list(model.tables[seq])
                model.next_id += 1
            else:  # a sequence finishes
                seq = live[rand(len(live))]
                what = f"op {step} (free a sequence holding blocks {model.tables[seq]})"
                _free_sequence(alloc, model, seq, what)
            _check_state(alloc, model, what)
            n_ops += 1
        # Fill the pool, then one more allocation must raise and change nothing.
        while sum(c == 0 for c in model.held()):
            model.tables.setdefault(-1, []).append(_allocate(alloc, model, "filling the pool"))
        _expect_raises(alloc.allocate, f"allocate() on a full pool of {num_blocks} blocks",
                       "Handing out a block twice would let two sequences overwrite each other's K/V.")
        _check_state(alloc, model, "a failed allocate() on a full pool")
        # Free everything; a second free of the same block is a bug in the caller and must say so.
        for seq in list(model.tables):
            _free_sequence(alloc, model, seq, "freeing every sequence")
        _check_state(alloc, model, "freeing every sequence")
        b = _allocate(alloc, model, "allocate() after freeing everything")
        expect(alloc.free(b) in (True, 1), f"free({b}) of a block with one reference should return True.")
        _expect_raises(lambda alloc=alloc, b=b: alloc.free(b), f"free({b}) of a block that is already free",
                       "A double free means a stale block table; raising ValueError finds the bug, "
                       "silently accepting it corrupts the pool.", ValueError)
        _check_state(alloc, _Model(num_blocks), "a double free")
        n_ops += 1
    return f"{n_ops} random operations on pools of 5, 11 and 23 blocks (new, grow, fork, free, full pool, double free)"


# --- 3. paged attention for one sequence ----------------------------------------------------------------


def _one_case(g: torch.Generator, n: int, bs: int, hq: int, hkv: int, d: int):
    """A pool with this sequence's blocks shuffled among others; every slot it does not own is NaN."""
    blocks = -(-n // bs)
    num_blocks = blocks + 3 + int(torch.randint(0, 4, (1,), generator=g))
    k_cache = random_signed(num_blocks, bs, hkv, d, generator=g)
    v_cache = random_signed(num_blocks, bs, hkv, d, generator=g)
    ids = torch.randperm(num_blocks, generator=g)
    table_ids, others = ids[:blocks], ids[blocks:]
    k_cache[others] = float("nan")  # blocks of other sequences (or free): never read them
    v_cache[others] = float("nan")
    tail = blocks * bs - n
    if tail:  # the unfilled end of the last block: stale data from a freed sequence
        k_cache[table_ids[-1], bs - tail:] = float("nan")
        v_cache[table_ids[-1], bs - tail:] = float("nan")
    # The table is wider than needed; its unused entries point at a NaN block too.
    block_table = torch.cat([table_ids, others[:2]]).to(torch.int32)
    q = random_signed(hq, d, generator=g)
    return q, k_cache, v_cache, block_table


def _one_ref(q, k_cache, v_cache, block_table, n, *, scale=True, gqa="div"):
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    pos = torch.arange(n)
    blocks = block_table.long()[pos // bs]
    k = k_cache[blocks, pos % bs].double()  # [n, Hkv, D]
    v = v_cache[blocks, pos % bs].double()
    hq = q.shape[0]
    kv_of = torch.arange(hq) // (hq // hkv) if gqa == "div" else torch.arange(hq) % hkv
    k, v = k[:, kv_of], v[:, kv_of]  # [n, Hq, D]
    scores = torch.einsum("hd,nhd->hn", q.double(), k)
    if scale:
        scores = scores / math.sqrt(q.shape[-1])
    return torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)


@checker("paged_attention_one")
def check_paged_attention_one(fn):
    """Random signed K/V in a pool with shuffled blocks; every slot the sequence does not own (other
    blocks, the unfilled tail of its last block, unused table entries) holds NaN, so reading one shows."""
    g = torch.Generator().manual_seed(203)
    shapes = [(4, 4, 16), (8, 2, 32), (6, 3, 16), (4, 1, 24)]  # (Hq, Hkv, D): MHA, GQA, MQA
    cases = [(1, 16, *shapes[0])]
    for i in range(7):
        bs = [3, 4, 8, 16][i % 4]
        cases.append((awkward_length(g, 2, 60), bs, *shapes[i % len(shapes)]))
    for n, bs, hq, hkv, d in cases:
        q, k_cache, v_cache, table = _one_case(g, n, bs, hq, hkv, d)
        call = (f"paged_attention_one(q [{hq}, {d}], k_cache/v_cache {list(k_cache.shape)}, block_table "
                f"{table.tolist()}, context_len={n})")
        got = fn(q.clone(), k_cache.clone(), v_cache.clone(), table.clone(), n)
        got = expect_shape(got, (hq, d), f"the output of {call}")
        want = _one_ref(q, k_cache, v_cache, table, n)
        hint = ""
        if torch.isnan(got).any():
            hint = (f"Likely cause: you read slots the sequence does not own. Only positions 0 .. {n - 1} are real: the last "
                    "block is only partly filled, and table entries past ceil(context_len / block_size) are unused.")
        elif hkv not in (1, hq):
            if torch.allclose(got.double(), _one_ref(q, k_cache, v_cache, table, n, gqa="mod"), atol=1e-5):
                hint = (f"Query head h must read KV head h // {hq // hkv} (heads are grouped in consecutive runs, "
                        f"as in repeat_interleave), not h % {hkv}.")
        if not hint and torch.allclose(got.double(), _one_ref(q, k_cache, v_cache, table, n, scale=False), atol=1e-5):
            hint = "It equals attention without the 1/sqrt(head_dim) scale on the scores."
        expect_close(got, want.float(), f"the output of {call}", atol=2e-5, rtol=1e-4, hint=hint)
    return (f"{len(cases)} sequences (lengths 1 to 60, block sizes 3 to 16, MHA, GQA and MQA heads, NaN in every "
            "slot the sequence does not own)")


# --- 4. merging split-KV partial results ----------------------------------------------------------------


def _split_sizes(g: torch.Generator, n: int, s: int) -> list[int]:
    """n keys cut into s contiguous splits, some of them empty."""
    cuts = sorted(int(c) for c in torch.randint(0, n + 1, (s - 1,), generator=g))
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def _partials(scores: torch.Tensor, v: torch.Tensor, sizes: list[int]):
    """scores [..., n], v [..., n, D] -> outs [S, ..., D] (each split normalised by its own sum), lses [S, ...]."""
    outs, lses, at = [], [], 0
    for size in sizes:
        s, vv = scores[..., at:at + size], v[..., at:at + size, :]
        if size == 0:
            outs.append(torch.zeros(*scores.shape[:-1], v.shape[-1], dtype=torch.float64))
            lses.append(torch.full(scores.shape[:-1], float("-inf"), dtype=torch.float64))
        else:
            outs.append(torch.einsum("...n,...nd->...d", torch.softmax(s, -1), vv))
            lses.append(torch.logsumexp(s, -1))
        at += size
    return torch.stack(outs), torch.stack(lses)


@checker("merge_partials")
def check_merge_partials(fn):
    """Splits random attention problems into S pieces (some empty: lse = -inf, out = 0), computes each
    piece's normalised output and log-sum-exp, and compares your merge with attention over everything.
    Some cases have scores near 100, where exp(lse) overflows float32."""
    g = torch.Generator().manual_seed(204)
    cases = [((), 2, 5, 8, 0.0), ((3,), 4, 37, 16, 0.0), ((2, 4), 3, 50, 16, 100.0), ((5,), 6, 23, 8, 0.0),
             ((2, 2), 8, 61, 32, 120.0), ((), 1, 9, 8, 0.0), ((3,), 5, 3, 16, 0.0)]
    for lead, s, n, d, offset in cases:
        scores = random_signed(*lead, n, generator=g, dtype=torch.float64) * 3 + offset
        v = random_signed(*lead, n, d, generator=g, dtype=torch.float64)
        sizes = _split_sizes(g, n, s)
        if s > 1 and 0 not in sizes:
            sizes[1], sizes[0] = 0, sizes[0] + sizes[1]  # at least one empty split
        outs, lses = _partials(scores, v, sizes)
        want = torch.einsum("...n,...nd->...d", torch.softmax(scores, -1), v).float()
        call = f"merge_partials(outs {list(outs.shape)}, lses {list(lses.shape)}) with split sizes {sizes}"
        got = fn(outs.float(), lses.float())
        got = expect_shape(got, tuple(want.shape), f"the output of {call}")
        hint = ""
        if torch.isnan(got).any():
            hint = ("Likely cause: exp(lse) overflows once lse > 88 in float32, and -inf - (-inf) is NaN. Subtract the "
                    "largest lse before exponentiating; an empty split (lse = -inf) must get weight exactly 0.")
        elif torch.allclose(got.double(), outs[[i for i, z in enumerate(sizes) if z]].mean(0), atol=1e-4):
            hint = "It equals the plain mean of the non-empty splits: weigh each split by its share of the softmax sum."
        elif torch.allclose(got.double(), outs.mean(0), atol=1e-4):
            hint = "It equals the plain mean of the splits: weigh each split by its share of the softmax sum."
        expect_close(got, want, f"the output of {call}", atol=2e-5, rtol=1e-4, hint=hint)
    return (f"{len(cases)} attention problems cut into 1 to 8 splits (empty splits included, scores up to ~130, "
            "leading shapes [], [B] and [B, H])")

