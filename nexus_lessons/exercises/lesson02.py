"""Checkers for lesson 02 (paged attention), in the notebook's order. Solutions: `solutions/02_paged_attention.py`.

1. `slot_mapping(block_table, block_size, start, end)`: the pool slots of positions start..end-1.
2. `RefCountedAllocator(num_blocks)`: a block allocator with reference counts, `allocate`, `fork`, `free`,
   `refcount` and `num_free`; checked on random sequences of operations against the block tables they imply.
3. `cow_append(allocator, block_table, num_tokens, block_size)`: reserve the next token's slot, copying a
   shared, partly filled last block first (copy-on-write).
4. `paged_attention_one(q, k_cache, v_cache, block_table, context_len)`: one sequence's decode attention
   over its paged K/V (GQA, a length that is not a multiple of the block size).
5. `online_softmax_decode(q, k_cache, v_cache, block_tables, context_lens)`: a Triton kernel, one program per
   (sequence, query head), online softmax over tiles of a paged context.
6. `grouped_decode(q, k_cache, v_cache, block_tables, context_lens)`: a Triton kernel, one program per
   (sequence, KV head), all the query heads of a group in one [GROUP, D] tile against each K tile.
7. `merge_partials(outs, lses)`: the log-sum-exp merge of split-KV partial results (log-sum-exps up to
   +-1000, where the unshifted form overflows).

The Triton checkers run the kernels compiled on a GPU and under the interpreter on a CPU (small shapes).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
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

__all__ = [
    "check_allocator",
    "check_cow_append",
    "check_grouped_decode",
    "check_merge_partials",
    "check_online_softmax_decode",
    "check_paged_attention_one",
    "check_slot_mapping",
]


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


# --- 3. copy-on-write: appending into a shared block -----------------------------------------------------


def _cow_ref(alloc, table: list[int], n: int, bs: int):
    """What `cow_append` must do (the checker's twin of the solution)."""
    if n % bs == 0:  # the last block is full (or there is none): the token starts a new block
        table.append(alloc.allocate())
        return table[-1] * bs, None
    last = table[-1]
    if alloc.refcount(last) > 1:  # shared and partly filled: copy first, then write into the copy
        new = alloc.allocate()
        alloc.free(last)
        table[-1] = new
        return new * bs + n % bs, (last, new)
    return last * bs + n % bs, None


def _as_copy(copy, what: str, num_blocks: int):
    if copy is None:
        return None
    try:
        src, dst = (int(c) for c in copy)
    except (TypeError, ValueError):
        raise ExerciseFailure(f"{what}: the copy should be None or a pair (src, dst) of block ids, "
                              f"got {describe(copy)}.") from None
    expect(0 <= src < num_blocks and 0 <= dst < num_blocks and src != dst,
           f"{what}: the copy {(src, dst)} is not a pair of two different block ids in 0..{num_blocks - 1}.")
    return src, dst


class _CowPool:
    """A pool whose slots hold token ids, driven by the learner's `cow_append` and, in step, by the reference."""

    def __init__(self, fn, block_size: int, num_blocks: int) -> None:
        from ..paged import BlockAllocator

        self.fn, self.bs = fn, block_size
        self.alloc, self.ref = BlockAllocator(num_blocks), BlockAllocator(num_blocks)
        self.slots = torch.full((num_blocks * block_size,), -1, dtype=torch.long)
        self.seqs: dict[int, tuple[list[int], list[int], list[int]]] = {}  # id -> (table, tokens, reference table)
        self.next_seq, self.next_token = 0, 1000

    def add(self) -> int:
        self.seqs[self.next_seq] = ([], [], [])
        self.next_seq += 1
        return self.next_seq - 1

    def fork(self, seq: int) -> None:
        table, tokens, ref_table = self.seqs[seq]
        self.seqs[self.next_seq] = (self.alloc.fork(table), list(tokens), self.ref.fork(ref_table))
        self.next_seq += 1

    def free(self, seq: int, what: str) -> None:
        table, _, ref_table = self.seqs.pop(seq)
        self.alloc.free_many(table)
        self.ref.free_many(ref_table)
        self.check(what)

    def append(self, seq: int, what: str) -> None:
        """Reserve with the learner's function, make its copy, write the token (what the cache does)."""
        table, tokens, ref_table = self.seqs[seq]
        n, bs = len(tokens), self.bs
        call = f"{what}: cow_append(allocator, block_table={table}, num_tokens={n}, block_size={bs})"
        result = self.fn(self.alloc, table, n, bs)
        expect(isinstance(result, (tuple, list)) and len(result) == 2,
               f"{call} should return (slot, copy), got {describe(result)}.")
        slot, copy = result
        if isinstance(slot, torch.Tensor) and slot.numel() == 1:
            slot = slot.item()
        expect(isinstance(slot, Integral) and not isinstance(slot, bool) and 0 <= int(slot) < len(self.slots),
               f"{call} returned slot {slot!r}; a slot is an int in 0..{len(self.slots) - 1}.")
        copy = _as_copy(copy, call, self.alloc.num_blocks)
        _cow_ref(self.ref, ref_table, n, bs)
        if copy is not None:
            src, dst = copy
            self.slots[dst * bs:(dst + 1) * bs] = self.slots[src * bs:(src + 1) * bs]
        self.slots[int(slot)] = self.next_token
        tokens.append(self.next_token)
        self.next_token += 1
        expect(len(table) == -(-len(tokens) // bs),
               f"after {call}, the table holds {len(table)} blocks for {len(tokens)} tokens; it needs "
               f"ceil({len(tokens)} / {bs}) = {-(-len(tokens) // bs)}.")
        self.check(call)

    def check(self, after: str) -> None:
        """Every sequence reads back its own tokens; refcounts count the tables; no block more or less than needed."""
        bs = self.bs
        owner = {t: o for o, (_, toks, _) in self.seqs.items() for t in toks}
        for s, (table, tokens, _) in self.seqs.items():
            for p, want in enumerate(tokens):
                got = int(self.slots[table[p // bs] * bs + p % bs])
                if got == want:
                    continue
                if owner.get(got, s) != s:
                    why = (f"it holds token {got} of sequence {owner[got]}: a write landed in a block both still share. "
                           "When the last block is shared (refcount > 1) and partly filled, allocate a new block, "
                           "return (old, new) as the copy and write into the new one.")
                else:
                    why = ("its block was not copied right: the copy goes from the shared block to the new one, "
                           "copy=(src, dst), and the table must point at the new one.")
                raise ExerciseFailure(f"after {after}, sequence {s} reads {got} at position {p} instead of its "
                                      f"token {want}: {why}")
        try:
            self.alloc.check_consistent([t for t, _, _ in self.seqs.values()])
        except AssertionError as e:
            raise ExerciseFailure(f"after {after}, the allocator's refcounts do not count the live block tables "
                                  f"({e}). Replacing a shared block by its copy must drop one reference to the "
                                  "shared block (allocator.free(old)).") from None
        used, needed = self.alloc.num_used, self.ref.num_used
        expect(used >= needed,
               f"after {after}, the pool holds {used} blocks where copy-on-write needs {needed}: a token was written "
               "into a block other sequences still share, so they would see it. When the last block is shared "
               "(refcount > 1) and partly filled, allocate a new block, return (old, new) as the copy, and write "
               "into the new one.")
        expect(used <= needed,
               f"after {after}, the pool holds {used} blocks where copy-on-write needs {needed}. Copy only when the "
               "token goes into a shared, partly filled last block: a full last block needs a new block, not a copy; "
               "a block held by one sequence is written in place.")


@checker("cow_append")
def check_cow_append(fn):
    """Grows, forks and frees sequences at random in a pool whose slots hold token ids. After every append
    (your slot written, your copy made first), every live sequence must read back exactly its own tokens,
    the allocator's refcounts must count exactly the live block tables, and the pool must hold as many
    blocks as copy-on-write needs (the same operations replayed with the reference)."""
    g = torch.Generator().manual_seed(205)
    n_appends = 0

    def rand(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    for bs, num_blocks in ((4, 40), (3, 48), (8, 30)):
        pool = _CowPool(fn, bs, num_blocks)
        for step in range(70):
            op, live = rand(10), list(pool.seqs)
            if op < 2 or not live:  # a new sequence: its prompt goes in one token at a time
                seq = pool.add()
                for _ in range(awkward_length(g, 1, 2 * bs + 1, (bs,))):
                    if pool.alloc.num_free < 2:
                        break
                    pool.append(seq, f"op {step} (prompt of sequence {seq})")
                    n_appends += 1
            elif op < 4:  # fork: share every block
                pool.fork(live[rand(len(live))])
            elif op < 9 and pool.alloc.num_free >= 2:  # one sequence appends a token
                seq = live[rand(len(live))]
                pool.append(seq, f"op {step} (sequence {seq} appends)")
                n_appends += 1
            else:  # a sequence finishes
                seq = live[rand(len(live))]
                pool.free(seq, f"op {step} (free sequence {seq})")
    return (f"{n_appends} appends among random prompts, forks and frees (block sizes 3, 4 and 8): every sequence "
            "reads back its own tokens, refcounts match, exactly the blocks copy-on-write needs")


# --- 4. paged attention for one sequence ----------------------------------------------------------------


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


# --- 5 and 6. Triton decode kernels ------------------------------------------------------------------------


@contextmanager
def _interpreter_env(device: torch.device):
    """TRITON_INTERPRET=1 while a kernel runs on CPU tensors (the interpreter reads it again at run time)."""
    if device.type == "cuda":
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _kernel_case(g: torch.Generator, lengths: list[int], bs: int, hq: int, hkv: int, d: int, device):
    """A pool with the sequences' blocks shuffled among others; every slot no sequence owns is NaN, and the
    block-table rows are padded with a NaN block."""
    need = [-(-n // bs) for n in lengths]
    num_blocks = sum(need) + 2
    k_cache = random_signed(num_blocks, bs, hkv, d, generator=g)
    v_cache = random_signed(num_blocks, bs, hkv, d, generator=g)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    poison, spare = ids[-1], ids[-2]
    k_cache[[poison, spare]] = float("nan")
    v_cache[[poison, spare]] = float("nan")
    rows, at = [], 0
    for n, blocks in zip(lengths, need):
        table = ids[at:at + blocks]
        at += blocks
        tail = blocks * bs - n
        if tail:  # the unfilled end of the last block
            k_cache[table[-1], bs - tail:] = float("nan")
            v_cache[table[-1], bs - tail:] = float("nan")
        rows.append(table + [poison] * (max(need) + 1 - blocks))
    block_tables = torch.tensor(rows, dtype=torch.int32)
    context_lens = torch.tensor(lengths, dtype=torch.int32)
    q = random_signed(len(lengths), hq, d, generator=g)
    return [t.to(device) for t in (q, k_cache, v_cache, block_tables, context_lens)]


def _decode_ref(q, k_cache, v_cache, block_tables, context_lens, **kwargs) -> torch.Tensor:
    """float64 attention of each sequence's query over its context: [B, Hq, D]."""
    q, k_cache, v_cache = q.cpu(), k_cache.cpu(), v_cache.cpu()
    return torch.stack([_one_ref(q[b], k_cache, v_cache, block_tables[b].cpu(), int(n), **kwargs)
                        for b, n in enumerate(context_lens.tolist())])


def _tiled_mistake_ref(q, k_cache, v_cache, block_tables, context_lens, mistake: str, block_n: int = 16):
    """Two wrong online softmaxes over tiles of `block_n`, in float64: "no rescale" leaves out the factor
    exp(m_old - m_new); "unmasked" lets the last tile's positions past the context count with score 0."""
    B, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, hq, d, dtype=torch.float64)
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n)
        blocks = block_tables[b].cpu().long()[pos // bs]
        k = k_cache.cpu()[blocks, pos % bs].double()
        v = v_cache.cpu()[blocks, pos % bs].double()
        for h in range(hq):
            s = k[:, h // (hq // hkv)] @ q[b, h].cpu().double() / math.sqrt(d)
            vh = v[:, h // (hq // hkv)]
            if mistake == "unmasked":  # zero keys and values past the end: scores 0 that still count
                pad = -n % block_n
                s, vh = torch.cat([s, s.new_zeros(pad)]), torch.cat([vh, vh.new_zeros(pad, d)])
                out[b, h] = torch.softmax(s, 0) @ vh
                continue
            m, l_sum, acc = -math.inf, 0.0, torch.zeros(d, dtype=torch.float64)
            for t in range(0, n, block_n):
                m = max(m, float(s[t:t + block_n].max()))
                p = torch.exp(s[t:t + block_n] - m)
                l_sum, acc = l_sum + float(p.sum()), acc + p @ vh[t:t + block_n]
            out[b, h] = acc / l_sum
    return out


def _triton_hint(e: BaseException, device: torch.device) -> str:
    text = f"{type(e).__name__}: {e}"
    if device.type != "cuda" and ("outside of the scope of a kernel" in text or "cpu tensor" in text.lower()
                                  or "cuda" in text.lower()):
        return (" On a CPU the kernel runs under the Triton interpreter, which must be on before triton is "
                "first imported: restart the notebook's kernel and run the first cell (it sets TRITON_INTERPRET=1) "
                "before any other.")
    return ""


def _check_decode_kernel(fn, name: str, cases) -> None:
    """Runs a learner's decode launcher on each case and compares with float64 attention, with hints."""
    for q, k_cache, v_cache, block_tables, context_lens in cases:
        B, hq, d = q.shape
        hkv, bs = k_cache.shape[2], k_cache.shape[1]
        call = (f"{name}(q [{B}, {hq}, {d}], k_cache/v_cache {list(k_cache.shape)} (Hkv {hkv}, block size {bs}), "
                f"context_lens {context_lens.tolist()})")
        args = (q.clone(), k_cache.clone(), v_cache.clone(), block_tables.clone(), context_lens.clone())
        try:
            with _interpreter_env(q.device):
                got = fn(*args)
        except (NotImplementedError, ExerciseFailure):
            raise
        except Exception as e:
            raise ExerciseFailure(f"{call} raised {type(e).__name__}: {e}.{_triton_hint(e, q.device)}") from None
        got = expect_shape(got, (B, hq, d), f"the output of {call}")
        want = _decode_ref(q, k_cache, v_cache, block_tables, context_lens)
        g64 = got.detach().double().cpu()
        hint = ""
        if torch.isnan(g64).any():
            hint = ("NaN: the kernel read a slot the sequence does not own. Mask every K/V and block-table load with "
                    "position < context_len (other=0), and set the scores of masked positions to -inf.")
        elif hkv not in (1, hq) and torch.allclose(g64, _decode_ref(q, k_cache, v_cache, block_tables, context_lens,
                                                                    gqa="mod"), atol=1e-4):
            hint = f"Query head h must read KV head h // {hq // hkv}, not h % {hkv}."
        elif torch.allclose(g64, _decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale=False), atol=1e-4):
            hint = "It equals attention without the 1/sqrt(D) scale on the scores."
        elif torch.allclose(g64, _tiled_mistake_ref(q, k_cache, v_cache, block_tables, context_lens, mistake="no rescale"), atol=1e-4):
            hint = ("It equals the online softmax without the rescaling: when the running max grows from m to m', "
                    "multiply l and acc by exp(m - m') before adding the new tile.")
        elif torch.allclose(g64, _tiled_mistake_ref(q, k_cache, v_cache, block_tables, context_lens, mistake="unmasked"), atol=1e-4):
            hint = ("It equals attention in which the last tile's positions past the context count with score 0: "
                    "masking the loads (other=0) is not enough, set those scores to -inf before the max and exp.")
        else:
            wrong = [(b, h) for b in range(B) for h in range(hq)
                     if not torch.allclose(g64[b, h], want[b, h], atol=2e-5, rtol=1e-4)]
            heads = sorted({h for _, h in wrong})
            if wrong and len(heads) < hq:
                hint = (f"Only query heads {heads} are wrong (of {hq}); the others match. Every program must compute "
                        f"and store all the query heads it owns.")
            elif q.device.type == "cuda" and (g64 - want).abs().max() < 1e-2:
                hint = ("Close but not exact: on a GPU, tl.dot on float32 uses TF32 (10-bit mantissa) unless you pass "
                        "input_precision=\"ieee\".")
        expect_close(got, want.float(), f"the output of {call}", atol=2e-5, rtol=1e-4, hint=hint)


def _decode_cases(seed: int, device) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        _kernel_case(g, [1, 13, awkward_length(g, 2, 15)], 8, 4, 2, 16, device),  # one tile each
        _kernel_case(g, [awkward_length(g, 33, 60), 5, awkward_length(g, 17, 31)], 4, 6, 2, 32, device),  # group 3
        _kernel_case(g, [awkward_length(g, 40, 70), 9], 16, 4, 1, 16, device),  # MQA
        _kernel_case(g, [awkward_length(g, 20, 50)], 8, 2, 2, 32, device),  # MHA
    ]


@checker("online_softmax_decode")
def check_online_softmax_decode(fn):
    """Your Triton online-softmax decode (one program per (sequence, query head)) against float64 attention:
    random signed K/V in shuffled pages, lengths not multiples of the page or tile size, NaN in every slot
    a sequence does not own, MHA / GQA (groups of 2 and 3) / MQA. Small shapes: the interpreter is slow."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = _decode_cases(206, device)
    _check_decode_kernel(fn, "online_softmax_decode", cases)
    return (f"{len(cases)} batches (contexts of 1 to 70 tokens over pages of 4, 8 and 16, MHA, GQA, MQA, NaN outside "
            "every sequence), compared with float64 attention")


@checker("grouped_decode")
def check_grouped_decode(fn):
    """Your Triton GQA-grouped decode (one program per (sequence, KV head), all its query heads in one
    [GROUP, D] tile) against float64 attention, on the same kind of cases as the online-softmax checker."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = _decode_cases(207, device)
    _check_decode_kernel(fn, "grouped_decode", cases)
    return (f"{len(cases)} batches (groups of 1, 2, 3 and 4 query heads per KV head, contexts of 1 to 70 tokens, "
            "NaN outside every sequence), compared with float64 attention")


# --- 7. merging split-KV partial results ----------------------------------------------------------------


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
    Some cases have log-sum-exps near +1000 or -1000, where exp(lse) overflows or underflows even in float64."""
    g = torch.Generator().manual_seed(204)
    # (leading shape, splits, keys, head dim, score offset, dtype). Offsets of +-1000 give log-sum-exps that
    # exp() overflows (or underflows to 0/0) even in float64: only the max-subtracted form survives them.
    f32, f64 = torch.float32, torch.float64
    cases = [((), 2, 5, 8, 0.0, f32), ((3,), 4, 37, 16, 0.0, f32), ((2, 4), 3, 50, 16, 100.0, f32),
             ((5,), 6, 23, 8, 0.0, f32), ((2, 2), 8, 61, 32, 1000.0, f64), ((), 1, 9, 8, 0.0, f32),
             ((3,), 5, 3, 16, 0.0, f32), ((4,), 3, 29, 8, -1000.0, f64)]
    for lead, s, n, d, offset, dtype in cases:
        scores = random_signed(*lead, n, generator=g, dtype=torch.float64) * 3 + offset
        v = random_signed(*lead, n, d, generator=g, dtype=torch.float64)
        sizes = _split_sizes(g, n, s)
        if s > 1 and 0 not in sizes:
            sizes[1], sizes[0] = 0, sizes[0] + sizes[1]  # at least one empty split
        outs, lses = _partials(scores, v, sizes)
        want = torch.einsum("...n,...nd->...d", torch.softmax(scores, -1), v).to(dtype)
        call = (f"merge_partials(outs {list(outs.shape)}, lses {list(lses.shape)}) with split sizes {sizes}, "
                f"lse around {lses[torch.isfinite(lses)].mean().item():.0f}, {dtype}")
        got = fn(outs.to(dtype), lses.to(dtype))
        got = expect_shape(got, tuple(want.shape), f"the output of {call}")
        hint = ""
        if torch.isnan(got).any():
            hint = ("Likely cause: exp(lse) overflows (lse > 88 in float32, > 709 in float64) or underflows to 0/0 "
                    "(lse < -745), and -inf - (-inf) is NaN. Subtract the largest lse before exponentiating; an empty "
                    "split (lse = -inf) must get weight exactly 0.")
        elif torch.allclose(got.double(), outs[[i for i, z in enumerate(sizes) if z]].mean(0), atol=1e-4):
            hint = "It equals the plain mean of the non-empty splits: weigh each split by its share of the softmax sum."
        elif torch.allclose(got.double(), outs.mean(0), atol=1e-4):
            hint = "It equals the plain mean of the splits: weigh each split by its share of the softmax sum."
        expect_close(got, want, f"the output of {call}", atol=2e-5, rtol=1e-4, hint=hint)
    return (f"{len(cases)} attention problems cut into 1 to 8 splits (empty splits included, log-sum-exps from "
            "-1000 to +1000, leading shapes [], [B] and [B, H])")
