"""Reference solutions to the exercises of lesson 10 (`course/10_continuous_batching.ipynb`).

Each function has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson10` holds
the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove every
checker rejects them (and they are the lesson's "common pitfalls", written as code).
"""

from __future__ import annotations

import torch


def schedule_step(running, waiting, token_budget, max_num_seqs):
    """running: [(request_id, num_computed, num_tokens)] in priority order; waiting: [(request_id, num_tokens)]
    in queue order. Returns [(request_id, num_new_tokens)]: running first, each taking what it has not
    computed (capped by the budget left); then waiting requests, while budget, rows and seats last."""
    out = []
    for rid, computed, total in running:
        if token_budget == 0 or len(out) == max_num_seqs:
            break
        n = min(total - computed, token_budget)
        if n > 0:
            out.append((rid, n))
            token_budget -= n
    seated = len(running)
    for rid, total in waiting:
        if token_budget == 0 or len(out) == max_num_seqs or seated == max_num_seqs:
            break
        n = min(total, token_budget)  # a prompt longer than the budget left is cut: chunked prefill
        out.append((rid, n))
        token_budget -= n
        seated += 1
    return out


def step_metadata(block_tables, num_computed, num_new, block_size):
    """(positions, slot_mapping, query_start_loc, context_lens) of one packed step, as LongTensors."""
    positions, slots, qsl, lens = [], [], [0], []
    for table, c, n in zip(block_tables, num_computed, num_new):
        for p in range(c, c + n):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
        lens.append(c + n)
    return tuple(torch.tensor(x, dtype=torch.long) for x in (positions, slots, qsl, lens))


def bandwidth_bound(prompt_lens, output_lens, weight_bytes, kv_bytes_per_token, gbs):
    """Output tokens/s if each decode step only read the weights and every live request's K/V at gbs GB/s.
    Decode step s (s = 1, 2, ...) makes token s + 1 of each request with more than s outputs, over a
    context of prompt + s tokens; the first token comes from the prefill."""
    seconds = 0.0
    for s in range(1, max(output_lens)):
        context = sum(p + s for p, n in zip(prompt_lens, output_lens) if n > s)
        seconds += (weight_bytes + kv_bytes_per_token * context) / (gbs * 1e9)
    return sum(output_lens) / seconds


# --- plausible mistakes ----------------------------------------------------------------------------------


def schedule_prefill_first(running, waiting, token_budget, max_num_seqs):
    """Admits waiting prompts before the running requests (their decodes stall behind every new prompt)."""
    out = schedule_step([], waiting, token_budget, max_num_seqs - len(running))
    used = sum(n for _, n in out)
    return out + schedule_step(running, [], token_budget - used, max_num_seqs - len(out)) if used < token_budget else out


def schedule_no_chunks(running, waiting, token_budget, max_num_seqs):
    """Admits a waiting prompt only whole: a prompt longer than the budget left waits (no chunked prefill)."""
    out = schedule_step(running, [], token_budget, max_num_seqs)
    budget = token_budget - sum(n for _, n in out)
    seated = len(running)
    for rid, total in waiting:
        if total > budget or len(out) == max_num_seqs or seated == max_num_seqs:
            break
        out.append((rid, total))
        budget -= total
        seated += 1
    return out


def schedule_ignores_seats(running, waiting, token_budget, max_num_seqs):
    """Caps the rows of a step but not the seats: admits more requests than the batch can hold."""
    out = schedule_step(running, [], token_budget, max_num_seqs)
    budget = token_budget - sum(n for _, n in out)
    for rid, total in waiting:
        if budget == 0 or len(out) == max_num_seqs:
            break
        out.append((rid, min(total, budget)))
        budget -= min(total, budget)
    return out


def metadata_positions_from_zero(block_tables, num_computed, num_new, block_size):
    """Numbers each step's new tokens from 0, as if nothing were cached."""
    return step_metadata(block_tables, [0] * len(num_new), num_new, block_size)[:1] + \
        step_metadata(block_tables, num_computed, num_new, block_size)[1:]


def metadata_lens_without_new(block_tables, num_computed, num_new, block_size):
    """Leaves the new tokens out of context_lens (the query would not see itself)."""
    pos, slots, qsl, lens = step_metadata(block_tables, num_computed, num_new, block_size)
    return pos, slots, qsl, lens - torch.tensor(num_new)


def metadata_no_leading_zero(block_tables, num_computed, num_new, block_size):
    """query_start_loc as the running totals only (B entries, no leading 0)."""
    pos, slots, qsl, lens = step_metadata(block_tables, num_computed, num_new, block_size)
    return pos, slots, qsl[1:], lens


def bound_weights_once(prompt_lens, output_lens, weight_bytes, kv_bytes_per_token, gbs):
    """Reads the weights once for the whole run instead of once per step."""
    context = sum(p + s for s in range(1, max(output_lens)) for p, n in zip(prompt_lens, output_lens) if n > s)
    return sum(output_lens) / ((weight_bytes + kv_bytes_per_token * context) / (gbs * 1e9))


def bound_finished_still_read(prompt_lens, output_lens, weight_bytes, kv_bytes_per_token, gbs):
    """Keeps reading the K/V of requests that have finished."""
    seconds = 0.0
    for s in range(1, max(output_lens)):
        context = sum(p + min(s, n) for p, n in zip(prompt_lens, output_lens))
        seconds += (weight_bytes + kv_bytes_per_token * context) / (gbs * 1e9)
    return sum(output_lens) / seconds


MISTAKES = {
    "schedule_step": [schedule_prefill_first, schedule_no_chunks, schedule_ignores_seats],
    "step_metadata": [metadata_positions_from_zero, metadata_lens_without_new, metadata_no_leading_zero],
    "bandwidth_bound": [bound_weights_once, bound_finished_still_read],
}
