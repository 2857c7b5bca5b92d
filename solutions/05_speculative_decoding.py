"""Reference solutions to the exercises of lesson 05 (`course/05_speculative_decoding.ipynb`).

Each function has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson05`
holds the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove
every checker rejects them (they are the lesson's common pitfalls, written as code).
"""

from __future__ import annotations

import torch


def residual_distribution(p, q):
    """norm(max(0, p - q)) along the last dimension; p itself where nothing is left (p == q)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def count_accepted(p, q, drafts, u):
    """How many drafts one row keeps: p [k+1, V], q [k, V], drafts [k], u [k] uniforms in [0, 1)."""
    n = 0
    for i, d in enumerate(drafts.tolist()):
        if not u[i] * q[i, d] < p[i, d]:  # accept with probability min(1, p/q)
            break
        n += 1
    return n


def speculative_speedup(alpha, k, c):
    """E[tokens per step] / (1 + k c), E = 1 + alpha + ... + alpha^k."""
    expected = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return expected / (1 + k * c)


def ngram_propose(tokens, n, k):
    """Up to k tokens that followed the latest earlier occurrence of the last m tokens, m = n, n - 1, ..., 1."""
    for m in range(min(n, len(tokens) - 1), 0, -1):
        tail = tokens[-m:]
        for start in range(len(tokens) - m - 1, -1, -1):  # latest first; the tail itself is not "earlier"
            if tokens[start:start + m] == tail:
                return tokens[start + m:start + m + k]
    return []


# --- wrong answers the checkers must catch ----------------------------------------------------------------


def residual_not_normalised(p, q):
    """max(0, p - q) without dividing by its sum."""
    return (p - q).clamp(min=0)


def residual_backwards(p, q):
    """Where the draft wants more than the target: the wrong side of the difference."""
    return residual_distribution(q, p)


def residual_nan_when_equal(p, q):
    """Right wherever something is left; 0 / 0 = NaN where p == q."""
    r = (p - q).clamp(min=0)
    return r / r.sum(-1, keepdim=True)


def count_accepted_no_stop(p, q, drafts, u):
    """Counts every passing draft, even after a rejection."""
    return sum(int(u[i] * q[i, d] < p[i, d]) for i, d in enumerate(drafts.tolist()))


def count_accepted_inverted(p, q, drafts, u):
    """Tests u < q / p: keeps drafts the target dislikes."""
    n = 0
    for i, d in enumerate(drafts.tolist()):
        if not u[i] * p[i, d] < q[i, d]:
            break
        n += 1
    return n


def count_accepted_deterministic(p, q, drafts, u):
    """Keeps a draft only when p >= q: ignores u, so drafts with p < q are never kept."""
    n = 0
    for i, d in enumerate(drafts.tolist()):
        if p[i, d] < q[i, d]:
            break
        n += 1
    return n


def speculative_speedup_no_bonus(alpha, k, c):
    """Forgets the token the verify forward adds after the last kept draft."""
    expected = k if alpha == 1 else (1 - alpha ** k) / (1 - alpha)
    return expected / (1 + k * c)


def speculative_speedup_one_draft_cost(alpha, k, c):
    """Charges one draft forward per step instead of k."""
    expected = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return expected / (1 + c)


def speculative_speedup_divides_by_zero(alpha, k, c):
    """The closed form everywhere: 0 / 0 at alpha = 1."""
    return (1 - alpha ** (k + 1)) / (1 - alpha) / (1 + k * c)


def ngram_propose_first_occurrence(tokens, n, k):
    """The earliest occurrence instead of the latest."""
    for m in range(min(n, len(tokens) - 1), 0, -1):
        tail = tokens[-m:]
        for start in range(0, len(tokens) - m):
            if tokens[start:start + m] == tail:
                return tokens[start + m:start + m + k]
    return []


def ngram_propose_no_fallback(tokens, n, k):
    """Only the full n-gram: proposes nothing when it never occurred."""
    if len(tokens) <= n:
        return []
    tail = tokens[-n:]
    for start in range(len(tokens) - n - 1, -1, -1):
        if tokens[start:start + n] == tail:
            return tokens[start + n:start + n + k]
    return []


def ngram_propose_includes_match(tokens, n, k):
    """Proposes from the start of the occurrence: repeats the n-gram itself."""
    for m in range(min(n, len(tokens) - 1), 0, -1):
        tail = tokens[-m:]
        for start in range(len(tokens) - m - 1, -1, -1):
            if tokens[start:start + m] == tail:
                return tokens[start:start + k]
    return []


MISTAKES = {
    "residual_distribution": [residual_not_normalised, residual_backwards, residual_nan_when_equal],
    "count_accepted": [count_accepted_no_stop, count_accepted_inverted, count_accepted_deterministic],
    "speculative_speedup": [speculative_speedup_no_bonus, speculative_speedup_one_draft_cost,
                            speculative_speedup_divides_by_zero],
    "ngram_propose": [ngram_propose_first_occurrence, ngram_propose_no_fallback, ngram_propose_includes_match],
}
