"""Checkers for lesson 05 (speculative decoding). Solutions: `solutions/05_speculative_decoding.py`.

1. `residual_distribution(p, q)`: where to sample after a rejection, norm(max(0, p - q)).
2. `count_accepted(p, q, drafts, u)`: the acceptance rule for one row: how many drafts are kept.
3. `speculative_speedup(alpha, k, c)`: the cost model, E[tokens per step] / (1 + k c).
4. `ngram_propose(tokens, n, k)`: prompt lookup, latest earlier occurrence first, shorter n as fallback.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..speculative import NGramSpeculator
from ..speculative.rejection import residual
from . import ExerciseFailure, awkward_length, checker, describe, expect, expect_close, expect_shape

__all__ = ["check_count_accepted", "check_ngram_propose", "check_residual_distribution", "check_speculative_speedup"]


def _distributions(g: torch.Generator, rows: int, V: int, zeros: float = 0.3) -> torch.Tensor:
    """Random distributions with some exact zeros (tokens a top-k cut would remove)."""
    keep = torch.rand(rows, V, generator=g) > zeros
    keep[torch.arange(rows), torch.randint(V, (rows,), generator=g)] = True
    p = torch.rand(rows, V, generator=g).pow(2) * keep
    return p / p.sum(-1, keepdim=True)


# --- 1. the residual ------------------------------------------------------------------------------------


@checker("residual_distribution")
def check_residual_distribution(fn):
    """Random p and q (with zeros), rows where p == q, a batch shape; compared with norm(max(0, p - q))."""
    g = torch.Generator().manual_seed(501)
    cases = 0
    for V in (2, awkward_length(g, 5, 30), awkward_length(g, 100, 300)):
        p, q = _distributions(g, 6, V), _distributions(g, 6, V)
        q[0] = p[0]  # nothing left over: the row must still be a distribution (p itself)
        call = f"residual_distribution(p [6, {V}], q [6, {V}])"
        got = expect_shape(fn(p.clone(), q.clone()), (6, V), f"the result of {call}")
        expect(not bool(torch.isnan(got).any()),
               f"{call} has NaNs in row 0, where p == q: max(0, p - q) is all zeros there and 0 / 0 is NaN. "
               "A rejection cannot happen in that row, so return p.")
        hint = ""
        if torch.allclose(got[1:], (p - q).clamp(min=0)[1:], atol=1e-6):
            hint = "Your rows are max(0, p - q) but do not sum to 1: normalise them."
        elif torch.allclose(got[1:], residual(q, p)[1:], atol=1e-6):
            hint = "You computed max(0, q - p): the residual is where the *target* wants more than the draft gave."
        elif torch.allclose(got[1:], ((p - q).abs() / (p - q).abs().sum(-1, keepdim=True))[1:], atol=1e-6):
            hint = "|p - q| counts tokens the draft over-proposed too; keep only the positive part, max(0, p - q)."
        expect_close(got, residual(p, q), call, atol=1e-6, rtol=1e-5, hint=hint)
        cases += 1
    p, q = _distributions(g, 12, 17).view(3, 4, 17), _distributions(g, 12, 17).view(3, 4, 17)
    expect_close(expect_shape(fn(p, q), (3, 4, 17), "residual_distribution on [3, 4, 17]"), residual(p, q),
                 "residual_distribution(p [3, 4, 17], q [3, 4, 17])", atol=1e-6, rtol=1e-5,
                 hint="Work along the last dimension only (dim=-1), whatever comes before it.")
    return f"{cases + 1} random cases (vocabularies of 2 to 300, zeros in p and q, rows with p == q, a 3-D batch)"


# --- 2. the acceptance rule -----------------------------------------------------------------------------


def _count_accepted(p, q, drafts, u) -> int:
    n = 0
    for i, d in enumerate(drafts.tolist()):
        if not u[i] * q[i, d] < p[i, d]:
            break
        n += 1
    return n


def _as_count(x, what: str) -> int:
    if x is None:
        raise ExerciseFailure(f"{what} returned None; it should return how many drafts are accepted (an int).")
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, int):
        raise ExerciseFailure(f"{what} should return an int, got {describe(x)}.")
    return x


@checker("count_accepted")
def check_count_accepted(fn):
    """Random rows: drafts drawn from q, uniforms u; special cases p(d) = 0 (always rejected) and
    p(d) >= q(d) (always accepted); compared with the rule draft by draft."""
    g = torch.Generator().manual_seed(502)
    cases = 0
    for trial in range(40):
        k, V = int(torch.randint(1, 9, (1,), generator=g)), awkward_length(g, 3, 40)
        p, q = _distributions(g, k + 1, V), _distributions(g, k, V, zeros=0.0)
        drafts = torch.multinomial(q, 1, generator=g)[:, 0]
        u = torch.rand(k, generator=g)
        if trial % 5 == 1:  # a draft the target never picks: rejected whatever u is
            i, d = k // 2, int(drafts[k // 2])
            p[i, d] = 0
            p[i, (d + 1) % V] += 0.5
            p[i] /= p[i].sum()
            u[i] = 0.0
        if trial % 5 == 2:  # the target likes every draft twice as much as the draft: all kept, even at u -> 1
            for i, d in enumerate(drafts.tolist()):
                p[i, d] += 0.1
                p[i] /= p[i].sum()
                rest = q[i].clone()
                rest[d] = 0
                q[i] = rest / rest.sum() * (1 - 0.5 * p[i, d])
                q[i, d] = 0.5 * p[i, d]
            u.fill_(0.999)
        want = _count_accepted(p, q, drafts, u)
        call = f"count_accepted(p [{k + 1}, {V}], q [{k}, {V}], drafts {drafts.tolist()}, u)"
        got = _as_count(fn(p.clone(), q.clone(), drafts.clone(), u.clone()), call)
        if got != want:
            ratios = [round(float(p[i, d] / q[i, d]), 3) for i, d in enumerate(drafts.tolist())]
            tests = [bool(u[i] < r) for i, r in enumerate(ratios)]
            raise ExerciseFailure(
                f"{call} returned {got}, expected {want}. Draft i is kept when u[i] < p[i, d_i] / q[i, d_i]; here the "
                f"ratios are {ratios}, u is {[round(float(x), 3) for x in u]}, so the tests give {tests}. Count the "
                "leading run of passes: the first rejection ends the step (later drafts were guessed from a "
                "prefix the target just changed).")
        cases += 1
    return f"{cases} random rows (k 1 to 8, drafts the target never picks, drafts it always keeps)"


# --- 3. the cost model ----------------------------------------------------------------------------------


def _speedup(alpha: float, k: int, c: float) -> float:
    e = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return e / (1 + k * c)


@checker("speculative_speedup")
def check_speculative_speedup(fn):
    """alpha from 0 to 1 (both ends included), k from 1 to 12, c from 0 to 1."""
    g = torch.Generator().manual_seed(503)
    cases = [(0.0, 4, 0.1), (1.0, 5, 0.2), (0.8, 1, 0.0), (0.5, 3, 1.0)]
    cases += [(round(float(torch.rand(1, generator=g)), 4), int(torch.randint(1, 13, (1,), generator=g)),
               round(float(torch.rand(1, generator=g)), 4)) for _ in range(20)]
    for alpha, k, c in cases:
        call = f"speculative_speedup(alpha={alpha}, k={k}, c={c})"
        got = fn(alpha, k, c)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        expect(isinstance(got, Real) and not isinstance(got, bool), f"{call} should return a number, got {describe(got)}.")
        want = _speedup(alpha, k, c)
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            hint = ""
            if alpha < 1 and math.isclose(got, (1 - alpha ** k) / (1 - alpha) / (1 + k * c), rel_tol=1e-6):
                hint = (" That is one token short when all k drafts pass: the target's forward also gives the next "
                        "token (the bonus), so E = 1 + alpha + ... + alpha^k.")
            elif math.isclose(got, _speedup(alpha, k, c) * (1 + k * c) / (1 + c), rel_tol=1e-6):
                hint = " The step runs the draft k times: its cost is k c + 1, not c + 1."
            raise ExerciseFailure(f"{call} = {got!r}, expected {want:.6g}.{hint}")
    return f"{len(cases)} cases (alpha = 0 and 1 included)"


# --- 4. prompt lookup -----------------------------------------------------------------------------------


@checker("ngram_propose")
def check_ngram_propose(fn):
    """Token lists with planted repeats (several occurrences, overlapping ones, none at all); compared with
    `NGramSpeculator(n).propose`."""
    g = torch.Generator().manual_seed(504)
    fixed = [([1, 2, 3, 4, 5, 6, 1, 2, 3], 3, 4), ([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3], 3, 4),
             ([4, 1, 2, 8, 3, 1, 2], 3, 4), ([5, 5, 5, 5], 3, 4), ([1, 2, 3], 2, 5), ([7], 2, 3)]
    cases = list(fixed)
    for _ in range(25):
        vocab = int(torch.randint(3, 12, (1,), generator=g))
        tokens = torch.randint(vocab, (awkward_length(g, 6, 60),), generator=g).tolist()
        cases.append((tokens, int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))))
    for tokens, n, k in cases:
        want = NGramSpeculator(n).propose([tokens], k)[0]
        call = f"ngram_propose({tokens}, n={n}, k={k})"
        got = fn(list(tokens), n, k)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        expect(isinstance(got, (list, tuple)), f"{call} should return a list of token ids, got {describe(got)}.")
        got = [int(t) for t in got]
        if got != want:
            raise ExerciseFailure(
                f"{call} returned {got}, expected {want}. Look for the last {n} tokens earlier in the list (the "
                f"*latest* earlier occurrence, not the tail itself); if they never occurred, try the last {n - 1}, "
                "and so on down to 1. Propose up to k tokens that followed the occurrence, never past the end.")
    return f"{len(cases)} token lists (repeats, overlaps, no match, n from 1 to 4)"
