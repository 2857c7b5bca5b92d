"""Checkers for lesson 10 (continuous batching and the serving engine). Solutions: `solutions/10_continuous_batching.py`.

1. `schedule_step(running, waiting, token_budget, max_num_seqs)`: one step of the engine's scheduling
   policy (running requests first, chunked prefill under a token budget, then admission in queue order).
2. `step_metadata(block_tables, num_computed, num_new, block_size)`: positions, slots, query offsets and
   context lengths of one packed varlen step.
3. `bandwidth_bound(prompt_lens, output_lens, weight_bytes, kv_bytes_per_token, gbs)`: the output tokens/s
   a serving workload cannot beat when every decode step must read the weights and the live K/V.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from . import ExerciseFailure, awkward_length, checker, describe, expect

__all__ = ["check_bandwidth_bound", "check_schedule_step", "check_step_metadata"]


# --- 1. the scheduling policy ----------------------------------------------------------------------------


def _schedule(running, waiting, budget, max_seqs):
    out = []
    for rid, computed, total in running:
        if budget == 0 or len(out) == max_seqs:
            break
        n = min(total - computed, budget)
        if n > 0:
            out.append((rid, n))
            budget -= n
    seated = len(running)
    for rid, total in waiting:
        if budget == 0 or len(out) == max_seqs or seated == max_seqs:
            break
        n = min(total, budget)
        out.append((rid, n))
        budget -= n
        seated += 1
    return out


def _schedule_hint(got, want, running, waiting, budget, max_seqs) -> str:
    got_ids = [r for r, _ in got]
    waiting_ids = {r for r, _ in waiting}
    if got_ids and got_ids[0] in waiting_ids and running:
        return "A waiting request came first: running requests go first, so their decodes never stall behind a prompt."
    if len(running) + sum(r in waiting_ids for r in got_ids) > max_seqs:
        return (f"Too many requests seated: {len(running)} running + the ones admitted must stay within "
                f"max_num_seqs = {max_seqs}, even when a running one has nothing to compute this step.")
    if sum(n for _, n in got) < sum(n for _, n in want):
        return ("Budget left unused: a waiting prompt longer than the budget that is left still gets that much "
                "(a chunk); the rest comes in later steps.")
    if len(got) > max_seqs:
        return f"More than max_num_seqs = {max_seqs} rows."
    if sum(n for _, n in got) > budget:
        return f"More than token_budget = {budget} tokens in total."
    return ""


def _as_pairs(x, what: str) -> list[tuple[int, int]]:
    if x is None:
        raise ExerciseFailure(f"{what} returned None; did you forget `return`?")
    try:
        pairs = [(int(a), int(b)) for a, b in x]
    except (TypeError, ValueError):
        raise ExerciseFailure(f"{what} should return a list of (request_id, num_new_tokens) pairs, got {describe(x)}.") from None
    return pairs


@checker("schedule_step")
def check_schedule_step(fn):
    """Hand-made edge cases, then random queues: decodes, prompts in progress, budgets that cut prompts."""
    g = torch.Generator().manual_seed(1001)
    cases = [
        ([(0, 4, 5), (1, 9, 10)], [(2, 30), (3, 7)], 16, 8),  # two decodes, then a chunk of request 2
        ([(0, 0, 40)], [(1, 3)], 16, 8),  # a prompt in progress takes the whole budget
        ([(0, 5, 6), (1, 7, 8), (2, 1, 2)], [(3, 4)], 64, 3),  # every seat taken: no admission
        ([], [(5, 3), (6, 100), (7, 2)], 50, 4),  # 3, then 47 of 100, then nothing left
        ([(4, 10, 10), (5, 2, 3)], [(6, 9)], 5, 4),  # a request with nothing to compute is skipped
        ([(0, 5, 6), (1, 8, 8)], [(2, 4), (3, 5)], 64, 3),  # ... but keeps its seat: one admission only
    ]
    for _ in range(24):
        R = int(torch.randint(0, 6, (1,), generator=g))
        running = []
        for rid in range(R):
            total = awkward_length(g, 1, 60)
            computed = total - 1 if bool(torch.rand(1, generator=g) < 0.6) else int(torch.randint(0, total, (1,), generator=g))
            running.append((rid, computed, total))
        waiting = [(R + j, awkward_length(g, 1, 90)) for j in range(int(torch.randint(0, 5, (1,), generator=g)))]
        budget = int(torch.randint(1, 80, (1,), generator=g))
        cases.append((running, waiting, budget, int(torch.randint(1, 8, (1,), generator=g))))
    for running, waiting, budget, max_seqs in cases:
        call = f"schedule_step(running={running}, waiting={waiting}, token_budget={budget}, max_num_seqs={max_seqs})"
        want = _schedule(running, waiting, budget, max_seqs)
        got = _as_pairs(fn([tuple(r) for r in running], [tuple(w) for w in waiting], budget, max_seqs), call)
        if got != want:
            hint = _schedule_hint(got, want, running, waiting, budget, max_seqs)
            raise ExerciseFailure(f"{call}: expected {want}, got {got}.{' ' + hint if hint else ''}")
    return f"{len(cases)} queues (decodes, prompts in progress, budgets that cut prompts, full seats)"


# --- 2. one packed step's metadata ----------------------------------------------------------------------


def _metadata(tables, computed, new, bs):
    pos, slots, qsl, lens = [], [], [0], []
    for table, c, n in zip(tables, computed, new):
        for p in range(c, c + n):
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
        lens.append(c + n)
    return pos, slots, qsl, lens


def _as_ints(x, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.dim() != 1:
            raise ExerciseFailure(f"{what} should be a 1-D integer tensor, got {describe(x)}.")
        return [int(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)) and all(isinstance(v, Integral) and not isinstance(v, bool) for v in x):
        return [int(v) for v in x]
    raise ExerciseFailure(f"{what} should be a 1-D integer tensor (or a list of ints), got {describe(x)}.")


@checker("step_metadata")
def check_step_metadata(fn):
    """Random batches mixing decodes (one new token) and prompt chunks; shuffled block tables."""
    g = torch.Generator().manual_seed(1002)
    names = ("positions", "slot_mapping", "query_start_loc", "context_lens")
    hints = {
        "positions": "A sequence's new tokens sit at positions num_computed, num_computed + 1, ...: after its cached ones.",
        "slot_mapping": "slot = block_table[p // block_size] * block_size + p % block_size, at each new token's position p.",
        "query_start_loc": "query_start_loc has B + 1 entries: 0, then the running total of num_new.",
        "context_lens": "context_lens counts every token the query may see: the cached ones and the new ones.",
    }
    for case in range(16):
        bs = [1, 3, 4, 5, 16][case % 5]
        B = int(torch.randint(1, 6, (1,), generator=g))
        computed, new = [], []
        for _ in range(B):
            c = int(torch.randint(0, 40, (1,), generator=g))
            n = 1 if bool(torch.rand(1, generator=g) < 0.5) else awkward_length(g, 1, 30)
            computed.append(c)
            new.append(n)
        need = [-(-(c + n) // bs) for c, n in zip(computed, new)]
        perm = torch.randperm(sum(need) + 3, generator=g).tolist()
        tables, at = [], 0
        for k in need:
            tables.append(perm[at:at + k])
            at += k
        call = f"step_metadata({tables}, num_computed={computed}, num_new={new}, block_size={bs})"
        got = fn([list(t) for t in tables], list(computed), list(new), bs)
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            raise ExerciseFailure(f"{call} should return 4 tensors {names}, got {describe(got)}.")
        for name, g_val, want in zip(names, got, _metadata(tables, computed, new, bs)):
            values = _as_ints(g_val, f"{name} of {call}")
            if values != want:
                raise ExerciseFailure(f"{name} of {call}: expected {want}, got {values}. {hints[name]}")
    return "16 packed batches (decodes and chunks, block sizes 1 to 16, shuffled block tables)"


# --- 3. the workload's bandwidth bound ------------------------------------------------------------------


def _bound(prompt_lens, output_lens, weight_bytes, kv, gbs):
    seconds = 0.0
    for s in range(1, max(output_lens)):
        live = [p + s for p, n in zip(prompt_lens, output_lens) if n > s]
        seconds += (weight_bytes + kv * sum(live)) / (gbs * 1e9)
    return sum(output_lens) / seconds


@checker("bandwidth_bound")
def check_bandwidth_bound(fn):
    """Random workloads against the reference; relative tolerance 1e-6."""
    g = torch.Generator().manual_seed(1003)
    cases = [([100], [2], 2_000_000_000, 65536, 3000.0),  # one decode step: weights + 101 tokens of K/V
             ([10, 20], [3, 1], 1000, 10, 1.0)]
    for _ in range(10):
        n = int(torch.randint(1, 30, (1,), generator=g))
        prompts = [int(x) for x in torch.randint(1, 2000, (n,), generator=g)]
        outputs = [int(x) for x in torch.randint(2, 300, (n,), generator=g)]
        cases.append((prompts, outputs, int(torch.randint(10**8, 10**10, (1,), generator=g)),
                      int(torch.randint(1000, 200000, (1,), generator=g)), float(torch.randint(500, 5000, (1,), generator=g))))
    for prompts, outputs, w, kv, gbs in cases:
        call = f"bandwidth_bound({prompts}, {outputs}, weight_bytes={w}, kv_bytes_per_token={kv}, gbs={gbs})"
        want = _bound(prompts, outputs, w, kv, gbs)
        got = fn(list(prompts), list(outputs), w, kv, gbs)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        expect(isinstance(got, Real) and not isinstance(got, bool), f"{call} should return a number, got {describe(got)}.")
        if not math.isclose(got, want, rel_tol=1e-6):
            ratio = got / want if want else float("nan")
            hint = ("Too high: is every step paying for the weights, and for the K/V of every live request?" if ratio > 1
                    else "Too low: does a finished request still count, or a step that only prefill does?")
            raise ExerciseFailure(f"{call}: expected {want:.6g} tokens/s, got {got:.6g} ({ratio:.3f}x). {hint}")
    return f"{len(cases)} workloads"
