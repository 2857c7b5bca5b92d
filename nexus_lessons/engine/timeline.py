"""Pictures of what the scheduler did: which request ran in which step, as a prefill chunk or a decode.

`record(engine, requests)` drives an engine step by step (requests arrive at given steps) and keeps, per
step, the scheduled rows, the preemptions, the finished requests, the blocks in use and the wall time.
`plot(timeline)` draws it as a chart (one row per request, one column per step) with the pool's use below;
`stepper(timeline)` is the same picture with a slider that walks through the steps (ipywidgets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .llm_engine import LLMEngine
from .sampling_params import SamplingParams

COLORS = {"prefill": "#f28e2b", "decode": "#4e79a7", "preempted": "#e15759", "waiting": "#eeeeee"}


@dataclass
class Step:
    rows: list[tuple[int, str, int]]  # (request id, "prefill" | "decode", tokens fed)
    preempted: list[int]
    finished: list[int]
    blocks_used: int
    time: float  # seconds since the recording started, when the step returned


@dataclass
class Timeline:
    steps: list[Step] = field(default_factory=list)
    arrivals: dict[int, int] = field(default_factory=dict)  # request id -> step it arrived
    num_blocks: int = 0
    outputs: dict[int, list[int]] = field(default_factory=dict)
    times: dict[int, list[float]] = field(default_factory=dict)  # when each output token was read back


def record(engine: LLMEngine, requests: list[tuple[list[int] | str, SamplingParams]],
           arrivals: list[int] | None = None) -> Timeline:
    """Run `requests` through the engine (request i is added before step arrivals[i]) and record each step."""
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    tl = Timeline(num_blocks=engine.cache.num_blocks)
    start = time.perf_counter()
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            rid = engine.add_request(*requests[i])
            tl.arrivals[rid] = step
            tl.outputs[rid] = []
            tl.times[rid] = []
        outs = engine.step()
        now = time.perf_counter() - start
        b = engine.last_batch
        rows = [] if b is None else [(s.request_id, "decode" if n == 1 else "prefill", n)
                                     for s, n in zip(b.seqs, b.num_new)]
        for o in outs:
            tl.outputs[o.request_id] += o.new_token_ids
            tl.times[o.request_id] += [now] * len(o.new_token_ids)
        tl.steps.append(Step(rows, [s.request_id for s in (b.preempted if b else [])],
                             [o.request_id for o in outs if o.finished], engine.cache.num_used_blocks, now))
        step += 1
    return tl


def max_token_gap(tl: Timeline, request_ids=None) -> float:
    """The longest wait between two consecutive output tokens of any of the requests (seconds)."""
    gaps = [b - a for rid, t in tl.times.items() if request_ids is None or rid in request_ids
            for a, b in zip(t, t[1:])]
    return max(gaps, default=0.0)


def plot(tl: Timeline, upto: int | None = None, axes=None, title: str = ""):
    """Requests (rows) by steps (columns): orange a prefill chunk, blue a decode, red x a preemption; below,
    the blocks in use. `upto` draws only the first steps (the stepper's frames)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps = tl.steps if upto is None else tl.steps[:upto]
    ids = sorted(tl.arrivals)
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(11, 0.28 * len(ids) + 2.6), sharex=True,
                               gridspec_kw={"height_ratios": [max(2, 0.28 * len(ids)), 1.1]})
    ax, ax2 = axes
    for x, s in enumerate(steps):
        for rid, kind, n in s.rows:
            ax.add_patch(plt.Rectangle((x, rid - 0.4), 1, 0.8, color=COLORS[kind], lw=0))
            if kind == "prefill" and len(tl.steps) <= 60:
                ax.text(x + 0.5, rid, str(n), ha="center", va="center", fontsize=6, color="white")
        for rid in s.preempted:
            ax.plot(x + 0.5, rid, "x", color=COLORS["preempted"], ms=7, mew=2)
        for rid in s.finished:
            ax.plot(x + 0.9, rid, "|", color="black", ms=7)
    for rid, a in tl.arrivals.items():
        ax.plot(a, rid, ">", color="gray", ms=4)
    ax.set(xlim=(0, len(tl.steps)), ylim=(max(ids, default=0) + 0.6, -0.6), ylabel="request")
    ax.set_title(title, loc="left", fontsize=9)
    ax.legend(handles=[Patch(color=COLORS["prefill"], label="prefill chunk (tokens)"),
                       Patch(color=COLORS["decode"], label="decode"),
                       plt.Line2D([], [], marker="x", color=COLORS["preempted"], ls="", label="preempted"),
                       plt.Line2D([], [], marker="|", color="black", ls="", label="finished (read back)")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=4, frameon=False)
    ax.grid(False)
    used = [s.blocks_used for s in steps]
    ax2.fill_between(range(len(used)), used, step="post", color="#76b7b2")
    ax2.axhline(tl.num_blocks, color="black", lw=1, ls="--")
    ax2.set(ylim=(0, tl.num_blocks * 1.1), ylabel="blocks used", xlabel="step")
    return axes


def stepper(tl: Timeline):
    """A slider over the steps: the chart up to that step, and what the step ran."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    slider = widgets.IntSlider(value=1, min=1, max=len(tl.steps), description="step", continuous_update=False)
    out = widgets.Output()

    def show(change=None) -> None:
        k = slider.value
        s = tl.steps[k - 1]
        with out:
            out.clear_output(wait=True)
            plot(tl, upto=k, title=f"step {k - 1}: " + (", ".join(f"r{r} {kind} {n}" for r, kind, n in s.rows)
                                                       or "nothing scheduled")[:150])
            plt.show()

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, out])
