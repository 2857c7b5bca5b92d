"""Pictures of a radix prefix cache, and a stepper that replays requests through one.

`draw_radix_tree(cache)` draws the tree: one box per node with its edge's tokens (as words, when a
vocabulary is given), the token positions it covers and the blocks it owns. Colours tell the last
step: green = the path a request matched, blue = nodes it inserted, orange outline = a node made by
a split; a dashed box holds only blocks nobody else uses (evictable), a thick one a block a running
sequence uses. "owns" lists the blocks the node holds; "shares b" says that its first positions sit
in block b of an ancestor (the node starts mid-block and the ancestor's block holds its tokens too).

`RadixStepper` drives a tensor-free pool (block tables + allocator + `RadixPrefixCache`) through a script
of requests and evictions, keeping a snapshot per step, so a notebook can step through it with a slider:

    st = RadixStepper(WORDS, num_blocks=12, block_size=4)
    st.serve("you are a helpful assistant . what is a cat ?")   # match, then compute and insert
    st.evict(2)
    st.widget()
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from ..paged.block_allocator import BlockAllocator
from ..paged.block_table import BlockTables
from .radix_cache import RadixNode, RadixPrefixCache


@dataclass
class NodeView:
    """One node, copied out of the tree."""

    id: int
    parent: int | None
    key: list[int]
    start: int
    blocks: dict[int, int]
    evictable: bool  # every block it owns is held by the cache alone
    in_use: bool  # a running sequence holds one of its blocks
    shares: int | None = None  # the ancestor's block it reads its first positions from, if it owns none there


@dataclass
class TreeSnapshot:
    nodes: list[NodeView]
    label: str = ""
    matched: set[int] = field(default_factory=set)
    inserted: set[int] = field(default_factory=set)
    split: set[int] = field(default_factory=set)
    num_blocks: int = 0
    num_free: int = 0  # free list + evictable
    num_evictable: int = 0
    block_size: int = 0


class _Ids:
    """Small stable ids for nodes (by object identity) across snapshots."""

    def __init__(self) -> None:
        self._ids: dict[int, int] = {}
        self._keep: list[RadixNode] = []  # keeps the objects alive, so id() is never reused

    def __call__(self, node: RadixNode) -> int:
        if id(node) not in self._ids:
            self._ids[id(node)] = len(self._ids) + 1
            self._keep.append(node)
        return self._ids[id(node)]


def snapshot(cache: RadixPrefixCache, label: str = "", ids: _Ids | None = None, **marks) -> TreeSnapshot:
    ids = ids or _Ids()
    alloc = cache.allocator
    nodes = []
    for n in cache.nodes():
        rcs = [alloc.refcount(b) for b in n.blocks.values()]
        first = n.start // cache.block_size
        shares = None
        if first not in n.blocks:  # read from the deepest ancestor that owns it
            up = n.parent
            while up is not cache.root and first not in up.blocks:
                up = up.parent
            shares = up.blocks.get(first)
        nodes.append(NodeView(ids(n), None if n.parent is cache.root else ids(n.parent), list(n.key), n.start,
                              dict(n.blocks), all(rc == 1 for rc in rcs), any(rc > 1 for rc in rcs), shares))
    return TreeSnapshot(nodes, label, num_blocks=alloc.num_blocks, num_free=alloc.num_free,
                        num_evictable=alloc.num_evictable, block_size=cache.block_size, **marks)


def _layout(snap: TreeSnapshot) -> dict[int | None, tuple[float, float]]:
    """x by leaves in order (parents centred over their children), y by depth."""
    children: dict[int | None, list[NodeView]] = {}
    for n in snap.nodes:
        children.setdefault(n.parent, []).append(n)
    for kids in children.values():
        kids.sort(key=lambda n: n.key[0])
    pos: dict[int | None, tuple[float, float]] = {}
    next_x = [0.0]

    def place(node_id, depth) -> float:
        kids = children.get(node_id, [])
        if not kids:
            x = next_x[0]
            next_x[0] += 1
        else:
            xs = [place(k.id, depth + 1) for k in kids]
            x = (xs[0] + xs[-1]) / 2
        pos[node_id] = (x, -depth)
        return x

    place(None, 0)
    return pos


def _text(tokens: list[int], words: list[str] | None, limit: int = 5) -> str:
    shown = [words[t] if words else str(t) for t in tokens[:limit]]
    more = f" …+{len(tokens) - limit}" if len(tokens) > limit else ""
    return " ".join(shown) + more


def draw_radix_tree(source, ax=None, *, words: list[str] | None = None, title: str | None = None):
    """Draw a `RadixPrefixCache` or a `TreeSnapshot`; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    snap = source if isinstance(source, TreeSnapshot) else snapshot(source)
    pos = _layout(snap)
    width = max([x for x, _ in pos.values()] + [1]) + 1
    depth = -min([y for _, y in pos.values()] + [0]) + 1
    if ax is None:
        _, ax = plt.subplots(figsize=(min(15, 2.2 + 2.4 * width), 1.0 + 1.25 * depth))
    fig = ax.figure
    by_id = {n.id: n for n in snap.nodes}
    for n in snap.nodes:
        (x0, y0), (x1, y1) = pos[n.parent], pos[n.id]
        ax.plot([x0, x1], [y0 - 0.18, y1 + 0.22], color="#888888", lw=1, zorder=1)
    ax.text(*pos[None], "root", ha="center", va="center", fontsize=9,
            bbox=dict(boxstyle="round", facecolor="#eeeeee", edgecolor="#888888"))
    for node_id, (x, y) in pos.items():
        if node_id is None:
            continue
        n = by_id[node_id]
        face = "#c8ecc8" if n.id in snap.matched else "#cfe2ff" if n.id in snap.inserted else "white"
        edge = "#e08a1e" if n.id in snap.split else "black"
        blocks = ", ".join(str(b) for b in n.blocks.values())
        blocks = " ".join(x for x in (f"shares {n.shares}" if n.shares is not None else "",
                                      f"owns {blocks}" if blocks else "") if x)
        label = f"{_text(n.key, words)}\n[{n.start}, {n.start + len(n.key)})  {blocks}"
        ax.text(x, y, label, ha="center", va="center", fontsize=8, zorder=2,
                bbox=dict(boxstyle="round", facecolor=face, edgecolor=edge,
                          lw=2.4 if n.in_use or n.id in snap.split else 1.0,
                          linestyle="--" if n.evictable else "-"))
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-depth + 0.45, 0.45)
    ax.axis("off")
    heading = title if title is not None else snap.label
    used = snap.num_blocks - snap.num_free
    heading = textwrap.fill(heading, 75, subsequent_indent="    ")
    ax.set_title(f"{heading}\npool: {used} blocks in use, {snap.num_evictable} cached and evictable, "
                 f"{snap.num_free - snap.num_evictable} free (of {snap.num_blocks}; block size {snap.block_size})",
                 fontsize=9, loc="left")
    fig.tight_layout()
    return fig


class RadixStepper:
    """Replay requests through a radix cache over a tensor-free pool, one snapshot per step."""

    def __init__(self, words: list[str], num_blocks: int = 12, block_size: int = 4) -> None:
        self.words = list(words)
        self._index = {w: i for i, w in enumerate(self.words)}
        self.allocator = BlockAllocator(num_blocks)
        self.tables = BlockTables(self.allocator, block_size)
        self.cache = RadixPrefixCache()
        self.cache.bind(self.allocator, block_size)
        self._ids = _Ids()
        self.steps: list[TreeSnapshot] = [snapshot(self.cache, "empty cache", self._ids)]

    def tokens(self, text: str) -> list[int]:
        """Words -> token ids (the stepper's toy tokenizer: one word, one token)."""
        try:
            return [self._index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not in this stepper's vocabulary") from None

    def _record(self, label: str, **marks) -> None:
        self.steps.append(snapshot(self.cache, f"step {len(self.steps)}: {label}", self._ids, **marks))

    def _node_ids(self) -> dict[int, RadixNode]:
        return {self._ids(n): n for n in self.cache.nodes()}

    def serve(self, text: str) -> int:
        """One request: match its longest cached prefix (a step), then compute the rest and cache the whole
        prompt (a step). Returns how many tokens the cache served."""
        prompt = self.tokens(text)
        before = self._node_ids()
        blocks, hit = self.cache.match(prompt[:-1])
        seq = self.tables.add_sequence(blocks, hit)
        path = {self._ids(n) for n, _ in self.cache._walk(prompt[:hit])} if hit else set()
        shared = " (ends mid-block: that block is shared, copied before writing)" if hit % self.tables.block_size else ""
        self._record(f"match '{_text(prompt, self.words, 8)}': {hit} of {len(prompt)} tokens cached{shared}",
                     matched=path)
        copies = self.tables.num_copies
        self.tables.append_slots(seq, len(prompt) - hit)  # may evict cached leaves to make room
        after_alloc = self._node_ids()
        evicted = [n for i, n in before.items() if i not in after_alloc]
        splits = self.cache.num_splits
        self.cache.insert(prompt, self.tables.block_table(seq))
        self.tables.free(seq)
        now = self._node_ids()
        new = {i for i in now if i not in after_alloc}
        made_by_split = {i for i in new if now[i].children} if self.cache.num_splits > splits else set()
        notes = []
        if evicted:
            notes.append(f"evicted {len(evicted)} leaf(s) for room")
        if self.tables.num_copies > copies:
            notes.append("copy-on-write")
        if made_by_split:
            notes.append("split a node")
        self._record(f"compute {len(prompt) - hit} token(s), insert" + (f" ({', '.join(notes)})" if notes else ""),
                     inserted=new - made_by_split, split=made_by_split)
        return hit

    def evict(self, num_blocks: int) -> int:
        freed = self.cache.evict(num_blocks)
        self._record(f"evict: {freed} block(s) freed (least recently used leaves first)")
        return freed

    def draw(self, step: int = -1, ax=None):
        return draw_radix_tree(self.steps[step], ax, words=self.words)

    def widget(self):
        """An ipywidgets slider over the recorded steps (needs ipywidgets, i.e. a notebook)."""
        import ipywidgets as widgets
        import matplotlib.pyplot as plt
        from IPython.display import display

        out = widgets.Output()
        slider = widgets.IntSlider(value=0, min=0, max=len(self.steps) - 1, description="step",
                                   continuous_update=False)

        def show(change=None) -> None:
            with out:
                out.clear_output(wait=True)
                fig = self.draw(slider.value)
                display(fig)
                plt.close(fig)

        slider.observe(show, names="value")
        show()
        return widgets.VBox([slider, out])


DEMO_WORDS = ("<s> you are a helpful assistant . what is cat dog ? name three colours animals the capital of "
              "france spain").split()


def demo_stepper(num_blocks: int = 9, block_size: int = 4) -> RadixStepper:
    """The lesson's script: a shared system prompt, questions that diverge mid-block (splits), a repeat
    (a full hit still computes its last token), a pool so small that least recently used leaves are
    evicted to make room, and an explicit eviction."""
    st = RadixStepper(list(DEMO_WORDS), num_blocks, block_size)
    system = "<s> you are a helpful assistant ."
    st.serve(f"{system} what is a cat ?")
    st.serve(f"{system} what is a dog ?")
    st.serve(f"{system} name three colours")
    st.serve(f"{system} what is a cat ?")
    st.serve(f"{system} what is the capital of france ?")
    st.serve("<s> what is the capital of spain ?")
    st.evict(1)
    return st
