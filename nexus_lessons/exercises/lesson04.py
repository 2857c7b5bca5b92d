"""Checkers for lesson 04 (prefix caching). Solutions: `solutions/04_prefix_caching.py`.

1. `chain_keys(token_ids, block_size, hash_fn)`: the hash-chained keys of a prompt's full blocks.
2. `match_blocks(index, token_ids, block_size, hash_fn)`: the longest cached prefix in a hash-keyed index,
   safe against collisions (a wrong hit must be impossible, whatever the hash).
3. `radix_insert(root, token_ids)`: insert a token sequence into a radix tree of dict nodes, splitting
   an edge where the sequence leaves it.
"""

from __future__ import annotations

import random
from numbers import Integral

from ..paged.block_allocator import BlockAllocator
from ..prefix.hash_cache import PrefixCache
from ..prefix.workloads import common_prefix_len
from . import ExerciseFailure, checker, describe, expect

__all__ = ["check_chain_keys", "check_match_blocks", "check_radix_insert"]


def _int_list(x, what: str) -> list[int]:
    if x is None:
        raise ExerciseFailure(f"{what} returned None; did you forget `return`?")
    if not isinstance(x, (list, tuple)) or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in x):
        raise ExerciseFailure(f"{what} should return a list of ints, got {describe(x)}.")
    return [int(v) for v in x]


def _strict_hash(parent, tokens):
    """The checkers' hash: refuses anything but (None or int, tuple of ints), so a slip shows at once."""
    if parent is not None and not isinstance(parent, int):
        raise ExerciseFailure(f"hash_fn got parent key {parent!r}; it must be the previous block's key (an int) "
                              "or None for the first block.")
    if not isinstance(tokens, tuple):
        raise ExerciseFailure(f"hash_fn got tokens as {type(tokens).__name__}; pass the block's tokens as a tuple "
                              "(hashable, and compared by value).")
    return hash((-1 if parent is None else parent, tokens)) & 0xFFFF_FFFF  # the same in every process


# --- 1. chained keys -----------------------------------------------------------------------------------


def _keys(tokens, b, hash_fn=_strict_hash):
    out, key = [], None
    for i in range(len(tokens) // b):
        key = hash_fn(key, tuple(tokens[i * b:(i + 1) * b]))
        out.append(key)
    return out


@checker("chain_keys")
def check_chain_keys(fn):
    """Random prompts (lengths that are not block multiples, and exact multiples), block sizes 1 to 16."""
    rng = random.Random(401)
    cases = [([5, 6, 7, 8, 9], 2), ([1, 2, 3, 4], 4), ([3], 4), ([], 3)]
    for _ in range(12):
        b = rng.choice([1, 2, 3, 4, 5, 8, 16])
        n = rng.randrange(0, 60)
        cases.append(([rng.randrange(1000) for _ in range(n)], b))
    for tokens, b in cases:
        call = f"chain_keys({tokens if len(tokens) < 12 else str(tokens[:10])[:-1] + ', ...]'}, block_size={b})"
        got = _int_list(fn(list(tokens), b, _strict_hash), call)
        want = _keys(tokens, b)
        if got == want:
            continue
        hint = ""
        if len(got) == -(-len(tokens) // b) and len(tokens) % b:
            hint = (f"It has a key for the partly filled last block ({len(tokens) % b} of {b} tokens): only full "
                    "blocks are cached, a partial one would still change.")
        elif got == [_strict_hash(None, tuple(tokens[i * b:(i + 1) * b])) for i in range(len(tokens) // b)]:
            hint = ("Each key hashes only its own block: chain it, hash_fn(previous key, tokens), so that the key "
                    "stands for the whole prefix and equal blocks after different prefixes differ.")
        elif got == [_strict_hash(None, tuple(tokens[:(i + 1) * b])) for i in range(len(tokens) // b)]:
            hint = ("It hashes the whole prefix each time: the same information, but O(i*b) work per block. Hash "
                    "the previous key with this block's tokens only.")
        raise ExerciseFailure(f"{call}: expected {len(want)} keys {want[:4]}{'...' if len(want) > 4 else ''}, got "
                              f"{got[:4]}{'...' if len(got) > 4 else ''}.{' ' + hint if hint else ''}")
    return f"{len(cases)} prompts (empty, shorter than a block, exact multiples, ragged ends), block sizes 1 to 16"


# --- 2. matching a hash-keyed index, collisions included ------------------------------------------------


def _collide(parent, tokens):
    """A hash with 7 values, whose parent part only sees the parent key's parity: collisions everywhere."""
    _strict_hash(parent, tokens)
    return (sum(tokens) + (0 if parent is None else 1 + parent % 2)) % 7


def _index_cases(rng: random.Random):
    """(PrefixCache over a block pool, block size, queries) with many keys shared by different prefixes."""
    for b, hash_fn in ((2, _collide), (3, _collide), (4, _strict_hash), (1, _collide)):
        cache = PrefixCache(hash_fn=hash_fn)
        alloc = BlockAllocator(200)
        cache.bind(alloc, b)
        stored = []
        for _ in range(6):
            base = rng.choice(stored) if stored and rng.random() < 0.6 else []
            cut = rng.randrange(0, len(base) + 1)
            seq = base[:cut] + [rng.randrange(1, 6) for _ in range(rng.randrange(1, 4 * b))]
            blocks = alloc.allocate_many(-(-len(seq) // b))
            cache.insert(seq, blocks)
            alloc.free_many(blocks)
            stored.append(seq)
        queries = [s[:rng.randrange(0, len(s) + 1)] + [rng.randrange(1, 6) for _ in range(rng.randrange(0, 3 * b))]
                   for s in stored] + stored
        # Collisions one block up: a cached chain P, then the tokens of a block E cached after another
        # prefix, whose key after P's chain is E's key. Tokens and key agree; only the parent tells.
        entries = list(cache._by_key.values())
        for p in entries:
            for e in entries:
                if e.parent is not p and hash_fn(p.key, e.tokens) == e.key:
                    queries.append(_chain_tokens(p) + list(e.tokens))
        yield cache, b, queries


def _chain_tokens(entry) -> list[int]:
    out = []
    while entry is not None:
        out = list(entry.tokens) + out
        entry = entry.parent
    return out


@checker("match_blocks")
def check_match_blocks(fn):
    """Indexes built by inserting random sequences that share prefixes, under hashes with 7 values (almost
    every key is taken by several prefixes) and under a good hash; queries are prefixes, divergent
    continuations, and blocks whose key and tokens collide with a cached block after another prefix."""
    rng = random.Random(402)
    n = 0
    for cache, b, queries in _index_cases(rng):
        index = dict(cache._by_key)
        for q in queries:
            want = cache.match(q)[0]
            call = f"match_blocks(index, {q}, block_size={b})"
            got = _int_list(fn(index, list(q), b, cache.hash_fn), call)
            n += 1
            if got == want:
                continue
            hint = ""
            if len(got) > len(want) and got[:len(want)] == want:
                entry = cache._by_block.get(got[len(want)])
                if entry is not None and entry.tokens != tuple(q[len(want) * b:(len(want) + 1) * b]):
                    hint = ("The extra block's key matched but its tokens differ: a hash collision. Compare the "
                            "cached tokens before counting a hit.")
                elif entry is not None:
                    hint = ("The extra block has the right key and tokens but follows another prefix (a collision "
                            "one block up): check that its parent is the block you matched just before.")
                else:
                    hint = "Stop at the first block that is not a hit: a prefix cannot skip a block."
            elif len(got) < len(want):
                hint = "You stopped early: keep walking while every block is a verified hit."
            raise ExerciseFailure(f"{call}: expected blocks {want}, got {got}.{' ' + hint if hint else ''}")
    return f"{n} queries against 4 indexes (block sizes 1 to 4), most keys colliding"


# --- 3. radix-tree insertion -------------------------------------------------------------------------------


def _spelled(root) -> set[tuple[int, ...]]:
    """Every token sequence a path from the root spells, node by node (ends of edges)."""
    out = set()

    def walk(node, prefix, depth):
        if depth > 200:
            raise ExerciseFailure("the tree is deeper than 200 nodes: a node is its own descendant?")
        if not isinstance(node, dict) or "key" not in node or "children" not in node:
            raise ExerciseFailure(f"every node must be a dict with 'key' and 'children', got {describe(node)}.")
        for first, child in node["children"].items():
            key = child.get("key") if isinstance(child, dict) else None
            if not key:
                raise ExerciseFailure(f"a child under prefix {list(prefix)} has an empty key: edges must hold at "
                                      "least one token (a sequence that ends inside or at the end of an edge needs "
                                      "no new node).")
            if key[0] != first:
                raise ExerciseFailure(f"under prefix {list(prefix)} the child stored at children[{first}] starts "
                                      f"with {key[0]}: children are keyed by the first token of their edge.")
            path = prefix + tuple(key)
            out.add(path)
            walk(child, path, depth + 1)

    walk(root, (), 0)
    return out


def _check_tree(root, inserted: list[list[int]], what: str) -> None:
    spelled = _spelled(root)
    prefixes = {tuple(s[:i]) for s in inserted for i in range(1, len(s) + 1)}
    for s in inserted:
        covered = any(p[:len(s)] == tuple(s) for p in spelled) or not s
        if not covered:
            matched = max((common_prefix_len(s, list(p)) for p in spelled), default=0)
            raise ExerciseFailure(f"after {what}, the tree does not hold {s}: only its first {matched} tokens "
                                  "are on a path from the root. Did an insert replace a child, or hang the rest "
                                  "of a sequence below an edge it left mid-way, instead of splitting that edge?")
    extra = [p for p in spelled if p not in prefixes]
    if extra:
        raise ExerciseFailure(f"after {what}, the tree spells {list(min(extra, key=len))}, which no inserted "
                              "sequence starts with: a split cut an edge at the wrong place?")


@checker("radix_insert")
def check_radix_insert(fn):
    """Inserts random sequences over a 3-token alphabet (so they share prefixes and diverge mid-edge),
    repeats and prefixes of earlier ones; after each insert the tree must spell exactly the prefixes of
    what was inserted, with non-empty edges keyed by their first token and each sequence's common prefix
    with the tree stored once."""
    rng = random.Random(403)
    n = 0
    for trial in range(6):
        root = {"key": [], "children": {}}
        inserted: list[list[int]] = []
        for step in range(9):
            if inserted and rng.random() < 0.5:
                base = rng.choice(inserted)
                seq = base[:rng.randrange(1, len(base) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 4))]
            else:
                seq = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
            before = _count_nodes(root)
            result = fn(root, list(seq))
            expect(result is None or isinstance(result, dict),
                   f"radix_insert should change the tree in place (return None or the root), got {describe(result)}.")
            inserted.append(seq)
            what = f"inserting {seq} (insert {step + 1} of trial {trial + 1}; earlier: {inserted[:-1]})"
            _check_tree(root, inserted, what)
            added = _count_nodes(root) - before
            expect(added <= 2, f"{what} added {added} nodes; at most two are ever needed (the upper half of a "
                               "split edge and one new leaf).")
            n += 1
    return f"{n} inserts in 6 random trees (shared prefixes, divergence mid-edge, repeats, prefixes)"


def _count_nodes(node) -> int:
    return sum(1 + _count_nodes(c) for c in node["children"].values())
