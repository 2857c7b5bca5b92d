"""Pictures of paged KV memory: the block pool and each sequence's block table.

Left: the pool, one square per block, filled (in its sequence's colour) as far as it holds tokens;
a block shared by several sequences is striped in all their colours and marked with its refcount.
Right: each sequence's block table, the list of block ids it reads in order.

`draw_block_pool(cache)` draws a live `PagedKVCache` or `BlockTables`. `BlockPoolStepper` replays a
script of operations (add a prompt, append tokens, fork, free) on tensor-free block tables and keeps a
snapshot per step, so a notebook can step through them with a slider:

    stepper = BlockPoolStepper(num_blocks=16, block_size=4)
    a = stepper.add(6)            # a 6-token prompt: one full block and half of another
    b = stepper.fork(a)           # parallel sampling: b shares both blocks
    stepper.append(b, 1)          # b writes into the shared half-full block: copy-on-write
    stepper.free(a)
    stepper.widget()              # ipywidgets slider over the steps
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_allocator import BlockAllocator
from .block_table import BlockTables

_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
            "#ccb974", "#64b5cd"]


def seq_color(seq_id: int) -> str:
    return _PALETTE[seq_id % len(_PALETTE)]


@dataclass
class PoolSnapshot:
    """Everything a picture needs, copied out so later steps do not change it."""

    num_blocks: int
    block_size: int
    tables: dict[int, list[int]]
    num_tokens: dict[int, int]
    refcount: list[int]
    label: str = ""
    copies: int = 0  # copy-on-write copies so far
    events: list[str] = field(default_factory=list)

    @property
    def num_free(self) -> int:
        return sum(rc == 0 for rc in self.refcount)

    def block_fill(self) -> dict[int, int]:
        """Tokens held by each used block (the most any of its holders has written into it)."""
        fill: dict[int, int] = {}
        for s, table in self.tables.items():
            for i, b in enumerate(table):
                fill[b] = max(fill.get(b, 0), min(self.block_size, self.num_tokens[s] - i * self.block_size))
        return fill

    def holders(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for s, table in self.tables.items():
            for b in table:
                out.setdefault(b, []).append(s)
        return out


def snapshot(source, label: str = "") -> PoolSnapshot:
    """A `PoolSnapshot` of a `PagedKVCache`, a `BlockTables`, or a snapshot (returned as is)."""
    if isinstance(source, PoolSnapshot):
        return source
    tables: BlockTables = getattr(source, "tables", source)
    if not isinstance(tables, BlockTables):
        raise TypeError(f"expected a PagedKVCache, BlockTables or PoolSnapshot, got {type(source).__name__}")
    alloc = tables.allocator
    return PoolSnapshot(
        num_blocks=alloc.num_blocks,
        block_size=tables.block_size,
        tables={s: tables.block_table(s) for s in tables.seq_ids()},
        num_tokens={s: tables.num_tokens(s) for s in tables.seq_ids()},
        refcount=[alloc.refcount(b) for b in range(alloc.num_blocks)],
        label=label,
        copies=tables.num_copies,
    )


def draw_block_pool(source, axes=None, *, title: str | None = None, max_cols: int = 8):
    """Draw the pool and the block tables; returns the matplotlib Figure.

    `source` is a PagedKVCache, BlockTables or PoolSnapshot; `axes` an optional pair (pool, tables).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    snap = snapshot(source)
    cols = min(max_cols, snap.num_blocks)
    rows = -(-snap.num_blocks // cols)
    n_seqs = max(1, len(snap.tables))
    widest = max([len(t) for t in snap.tables.values()] + [4])
    if axes is None:
        fig, axes = plt.subplots(
            1, 2, figsize=(min(14, 2.0 + 0.6 * (cols + widest + 3)), max(2.2, 0.65 * max(rows, n_seqs) + 1.0)),
            gridspec_kw={"width_ratios": [cols, widest + 3]},
        )
    ax_pool, ax_tab = axes
    fig = ax_pool.figure
    fill, holders = snap.block_fill(), snap.holders()

    # --- the pool ---
    for b in range(snap.num_blocks):
        x, y = b % cols, -(b // cols)
        ax_pool.add_patch(Rectangle((x, y), 0.92, 0.92, facecolor="white", edgecolor="#999999", lw=1))
        owners = holders.get(b, [])
        if owners:
            frac = fill[b] / snap.block_size
            band = 0.92 / len(owners)
            for i, s in enumerate(sorted(owners)):  # stripes: one band per holder
                ax_pool.add_patch(Rectangle((x, y + i * band), 0.92 * frac, band, facecolor=seq_color(s),
                                            edgecolor="none", alpha=0.85))
            if len(owners) > 1:
                ax_pool.add_patch(Rectangle((x, y), 0.92, 0.92, facecolor="none", edgecolor="black", lw=2.2))
                ax_pool.text(x + 0.88, y + 0.06, f"×{snap.refcount[b]}", ha="right", va="bottom", fontsize=8,
                             fontweight="bold")
        ax_pool.text(x + 0.05, y + 0.86, str(b), ha="left", va="top", fontsize=7, color="#333333")
    ax_pool.set_xlim(-0.1, cols)
    ax_pool.set_ylim(-rows + 0.9, 1.05)
    ax_pool.set_aspect("equal")
    ax_pool.axis("off")
    ax_pool.set_title(f"block pool: {snap.num_blocks - snap.num_free}/{snap.num_blocks} used, "
                      f"block_size {snap.block_size}", fontsize=10)

    # --- the block tables ---
    for r, (s, table) in enumerate(sorted(snap.tables.items())):
        y = -r
        ax_tab.text(-0.2, y + 0.45, f"seq {s} ({snap.num_tokens[s]} tok)", ha="right", va="center", fontsize=9,
                    color=seq_color(s), fontweight="bold")
        for i, b in enumerate(table):
            shared = snap.refcount[b] > 1
            ax_tab.add_patch(Rectangle((i, y), 0.9, 0.9, facecolor=seq_color(s), alpha=0.85,
                                       edgecolor="black" if shared else "none", lw=2.2 if shared else 0,
                                       hatch="//" if shared else None))
            ax_tab.text(i + 0.45, y + 0.45, str(b), ha="center", va="center", fontsize=9, color="white",
                        fontweight="bold")
    if not snap.tables:
        ax_tab.text(0, 0.45, "(no sequences)", va="center", fontsize=9, color="#777777")
    ax_tab.set_xlim(-3.2, widest)
    ax_tab.set_ylim(-n_seqs + 0.8, 1.1)
    ax_tab.set_aspect("equal")
    ax_tab.axis("off")
    ax_tab.set_title("block tables (hatched: shared)", fontsize=10)
    heading = title if title is not None else snap.label
    if heading:
        fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return fig


class BlockPoolStepper:
    """Replay add / append / fork / free on tensor-free block tables, one snapshot per step."""

    def __init__(self, num_blocks: int = 16, block_size: int = 4) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.tables = BlockTables(self.allocator, block_size)
        self.steps: list[PoolSnapshot] = [snapshot(self.tables, "empty pool")]

    def _record(self, label: str) -> None:
        self.steps.append(snapshot(self.tables, f"step {len(self.steps)}: {label}"))

    def add(self, num_tokens: int) -> int:
        """A new sequence with a `num_tokens`-token prompt; returns its id."""
        s = self.tables.add_sequence()
        if num_tokens:
            self.tables.append_slots(s, num_tokens)
        self._record(f"add seq {s} with a {num_tokens}-token prompt")
        return s

    def append(self, seq_id: int, n: int = 1) -> None:
        """Decode `n` tokens into `seq_id` (copy-on-write if its last block is shared)."""
        copies = self.tables.num_copies
        self.tables.append_slots(seq_id, n)
        cow = " (copy-on-write: its shared last block was copied)" if self.tables.num_copies > copies else ""
        self._record(f"append {n} token(s) to seq {seq_id}{cow}")

    def fork(self, seq_id: int) -> int:
        child = self.tables.fork(seq_id)
        self._record(f"fork seq {seq_id} -> seq {child} (blocks shared, nothing copied)")
        return child

    def free(self, seq_id: int) -> None:
        freed = self.tables.free(seq_id)
        self._record(f"free seq {seq_id}: {freed} block(s) back to the free list")

    def draw(self, step: int = -1, axes=None):
        return draw_block_pool(self.steps[step], axes)

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


def demo_stepper(num_blocks: int = 16, block_size: int = 4) -> BlockPoolStepper:
    """The lesson's script: two prompts, parallel sampling by fork, copy-on-write, growth, frees."""
    st = BlockPoolStepper(num_blocks, block_size)
    a = st.add(6)
    b = st.add(9)
    c = st.fork(a)
    st.append(a, 1)  # a writes into the shared, half-full block: it gets a copy
    st.append(c, 1)  # c is now its only holder: writes in place
    st.append(b, 4)
    st.append(c, 3)
    st.free(b)
    d = st.add(5)
    st.append(d, 2)
    st.free(a)
    st.free(c)
    return st
