"""A radix tree over token sequences, as SGLang's RadixAttention: longest-prefix match at token
granularity, node splitting, LRU eviction of leaves; the K/V stay in the paged pool's blocks.

Every edge is labelled with a run of tokens; a path from the root spells a cached token sequence, and
two sequences share the nodes of their common prefix. Matching a prompt walks down comparing tokens and
may stop anywhere, mid-edge included. Inserting a sequence walks the same way and, where it leaves
the tree mid-edge, *splits* that edge in two and hangs the rest of the sequence from the split point.

Tokens, not blocks. A node covers token positions [start, end) of every sequence through it, and its
K/V live in blocks of `block_size` positions, so a node boundary can fall inside a block. Block i of a
path is *owned* by one node: the node where block i starts, or a deeper node that holds its own copy
of it (a sequence that diverged inside block i wrote its tokens into a copy; the copy also holds the
tokens before the divergence, which are the same). A path reads block i from the deepest node on it
that owns one. A match that stops inside a block hands that block out shared; the sequence copies it
before writing its own next token there (copy-on-write), because the tree's reference makes it shared.

Eviction frees leaves, least recently used first, so every cached path stays reachable: a parent
becomes a leaf once its last child is gone. A leaf whose blocks a running sequence still holds frees
nothing; such leaves go last.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

from .base import BasePrefixCache, check_token_ids


class RadixNode:
    """One edge of the tree and the node it leads to."""

    __slots__ = ("key", "start", "parent", "children", "blocks", "last_access")

    def __init__(self, key: list[int], start: int, parent: RadixNode | None) -> None:
        self.key = key  # the tokens on the edge into this node
        self.start = start  # position of key[0] in every sequence through this node
        self.parent = parent
        self.children: dict[int, RadixNode] = {}  # by the first token of the child's key
        self.blocks: dict[int, int] = {}  # block index -> block id, for the blocks this node owns, ascending
        self.last_access = 0

    @property
    def end(self) -> int:
        return self.start + len(self.key)

    def __repr__(self) -> str:
        return f"RadixNode([{self.start}, {self.end}), key={self.key[:8]}{'...' if len(self.key) > 8 else ''}, " \
               f"blocks={self.blocks})"


def _common_prefix(key: list[int], tokens: list[int], at: int) -> int:
    """How many tokens of `key` equal tokens[at:]. List comparisons run in C: one for a whole edge, and a
    binary search for the first difference (equal prefixes only get shorter)."""
    n = min(len(key), len(tokens) - at)
    if key[:n] == tokens[at:at + n]:
        return n
    lo, hi = 0, n - 1  # key[:lo] matches, key[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[:mid] == tokens[at:at + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixPrefixCache(BasePrefixCache):
    """SGLang-style radix-tree prefix cache over a paged pool."""

    def __init__(self) -> None:
        super().__init__()
        self.root = RadixNode([], 0, None)
        self._clock = 0  # logical time for LRU
        self._leaves: set[RadixNode] = set()
        self.num_splits = 0  # for the lesson's counters

    # --- matching ---------------------------------------------------------------------------------
    def _walk(self, tokens: list[int]) -> Iterator[tuple[RadixNode, int]]:
        """(node, tokens of its key matched) along the path of `tokens`; the last may be a partial match."""
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                return
            k = _common_prefix(child.key, tokens, pos)
            yield child, k
            if k < len(child.key):
                return
            node, pos = child, pos + k

    def match(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        self._need_pool()
        tokens = check_token_ids(token_ids)
        self._clock += 1
        table: list[int] = []
        n = 0
        for node, k in self._walk(tokens):
            node.last_access = self._clock
            _read_blocks(table, node)
            n = node.start + k
        del table[-(-n // self.block_size):]
        return table, n

    # --- inserting --------------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> int:
        self._need_pool()
        tokens = check_token_ids(token_ids)
        blocks = list(blocks)
        b = self.block_size
        if len(blocks) < -(-len(tokens) // b):
            raise ValueError(f"{len(tokens)} tokens need {-(-len(tokens) // b)} blocks of {b}, got {len(blocks)}")
        self._clock += 1
        table: list[int] = []
        node, pos = self.root, 0
        while pos < len(tokens) and tokens[pos] in node.children:
            child = node.children[tokens[pos]]
            k = _common_prefix(child.key, tokens, pos)
            child.last_access = self._clock
            if k < len(child.key):
                if pos + k == len(tokens):  # the sequence ends inside this edge: cached already
                    return 0
                child = self._split(child, k)
            _read_blocks(table, child)
            node, pos = child, pos + k
        if pos == len(tokens):
            return 0
        leaf = RadixNode(tokens[pos:], pos, node)
        leaf.last_access = self._clock
        for i in range(pos // b, -(-len(tokens) // b)):
            block = blocks[i]
            if i < len(table) and table[i] == block:
                continue  # the path owns it already: this sequence was handed that block and never wrote into it
            if self.allocator.is_cached(block):
                raise RuntimeError(f"block {block} is cached by another node: the block table does not match the tree")
            self.allocator.hold(block)
            leaf.blocks[i] = block
        if not node.children and node is not self.root:
            self._leaves.discard(node)
        node.children[tokens[pos]] = leaf
        self._leaves.add(leaf)
        return len(leaf.blocks)

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut `node`'s edge after k tokens; returns the new upper node (which ends at the cut)."""
        at = node.start + k
        upper = RadixNode(node.key[:k], node.start, node.parent)
        upper.last_access = node.last_access
        # A block belongs to the node where it starts: the block holding the cut goes up, and the lower
        # half reads it from there.
        upper.blocks = {i: blk for i, blk in node.blocks.items() if i * self.block_size < at}
        node.blocks = {i: blk for i, blk in node.blocks.items() if i * self.block_size >= at}
        node.parent.children[upper.key[0]] = upper
        node.key, node.start, node.parent = node.key[k:], at, upper
        upper.children = {node.key[0]: node}
        self.num_splits += 1
        return upper

    # --- evicting ---------------------------------------------------------------------------------
    def _frees_nothing(self, node: RadixNode) -> bool:
        return all(self.allocator.refcount(blk) > 1 for blk in node.blocks.values())

    def evict(self, num_blocks: int) -> int:
        if self.allocator is None:
            return 0
        heap = [(self._frees_nothing(n), n.last_access, id(n), n) for n in self._leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < num_blocks and heap:
            _, _, _, leaf = heapq.heappop(heap)
            freed += self._remove_leaf(leaf)
            parent = leaf.parent
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (self._frees_nothing(parent), parent.last_access, id(parent), parent))
        return freed

    def _remove_leaf(self, leaf: RadixNode) -> int:
        freed = sum(self.allocator.release(blk) for blk in leaf.blocks.values())
        del leaf.parent.children[leaf.key[0]]
        self._leaves.discard(leaf)
        if leaf.parent is not self.root and not leaf.parent.children:
            self._leaves.add(leaf.parent)
        return freed

    # --- queries and checks -------------------------------------------------------------------------
    def nodes(self) -> list[RadixNode]:
        """Every node but the root, parents before children."""
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def blocks(self) -> list[int]:
        return [blk for n in self.nodes() for blk in n.blocks.values()]

    @property
    def num_cached_tokens(self) -> int:
        return sum(len(n.key) for n in self.nodes())

    def sequences(self) -> list[list[int]]:
        """The token sequence spelled by the path to each leaf (what the tree holds)."""
        out = []
        for leaf in self.nodes():
            if not leaf.children:
                path, n = [], leaf
                while n is not self.root:
                    path.append(n.key)
                    n = n.parent
                out.append([t for key in reversed(path) for t in key])
        return out

    def check_consistent(self) -> None:
        """Edges non-empty and keyed by their first token, positions contiguous, every block of a path
        owned once, the leaf set exact, and the allocator's cache references = the blocks owned."""
        b = self.block_size
        seen: set[int] = set()
        leaves: set[RadixNode] = set()
        stack = [(self.root, [])]
        while stack:
            node, table = stack.pop()
            for first, child in node.children.items():
                if not child.key or child.key[0] != first or child.parent is not node or child.start != node.end:
                    raise AssertionError(f"{child}: bad edge under {node}")
                idx = list(child.blocks)
                if idx != sorted(idx):
                    raise AssertionError(f"{child}: block indices out of order")
                lo, hi = child.start // b, (child.end - 1) // b
                need = range(-(-child.start // b), hi + 1)  # blocks that start inside this node
                if any(i < lo or i > hi for i in idx) or any(i not in child.blocks for i in need):
                    raise AssertionError(f"{child}: owns {idx} but covers blocks {lo}..{hi} (must own {list(need)})")
                if child.start % b and lo not in child.blocks and lo >= len(table):
                    raise AssertionError(f"{child}: no block on its path holds positions {lo * b}..")
                for blk in child.blocks.values():
                    if blk in seen:
                        raise AssertionError(f"block {blk} is owned by two nodes")
                    seen.add(blk)
                    if not self.allocator.is_cached(blk):
                        raise AssertionError(f"block {blk} is in the tree but the allocator has no cache reference")
                sub = list(table)
                _read_blocks(sub, child)
                stack.append((child, sub))
                if not child.children:
                    leaves.add(child)
        if leaves != self._leaves:
            raise AssertionError("the leaf set is stale")
        cached = sum(self.allocator.is_cached(blk) for blk in range(self.allocator.num_blocks))
        if cached != len(seen):
            raise AssertionError(f"the allocator has {cached} cache references but the tree owns {len(seen)} blocks")

    def __repr__(self) -> str:
        nodes = self.nodes()
        return (f"RadixPrefixCache(nodes={len(nodes)}, tokens={sum(len(n.key) for n in nodes)}, "
                f"blocks={sum(len(n.blocks) for n in nodes)}, block_size={self.block_size})")


def _read_blocks(table: list[int], node: RadixNode) -> None:
    """Extend a path's block list with `node`'s blocks; a deeper node's copy replaces its parent's."""
    for i, blk in node.blocks.items():
        if i < len(table):
            table[i] = blk
        else:
            table.append(blk)
