"""Speculative sampling's acceptance rule (Leviathan et al. 2023; Chen et al. 2023), vectorised over rows.

Row b proposes `num_drafts[b] <= k` tokens d_1..d_k, drawn from the draft's distributions q_1..q_k; one
target forward gives the target's distributions p_1..p_{k+1} at the same positions. Draft i is accepted
with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the first rejection; there the row's next
token is drawn from the residual norm(max(0, p_i - q_i)), and if every draft was accepted, from p_{k+1}
(the bonus token). Every token that comes out is distributed exactly as the target's own sample.
A deterministic proposer (n-gram lookup) is the case q_i = one-hot(d_i); temperature 0 is the limit
where a draft is accepted when it equals argmax p_i and the next token is argmax p_{n+1}.

Everything is tensor arithmetic with fixed shapes (no `.item()`, no Python branch on a value), so the
same code runs eagerly and inside a CUDA graph. Randomness comes in as uniforms the caller draws.
"""

from __future__ import annotations

import math

import torch


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs [..., V]` by inverting the CDF at `u [...]`, u uniform in (0, 1].

    Token r is chosen when cdf[r - 1] < u * total <= cdf[r], so a token of probability 0 is never
    chosen (its interval is empty) and rows need not be normalised.
    """
    cdf = probs.cumsum(-1)
    x = u.unsqueeze(-1) * cdf[..., -1:]
    return (cdf < x).sum(-1).clamp(max=probs.shape[-1] - 1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where the target wants more mass than the draft gave. When p == q there is
    nothing left (and a rejection cannot happen); p is returned so the row stays a distribution."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


def draw_uniforms(batch: int, k: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The randomness of one step, [B, 2k + 1]: k for drawing drafts and 1 for the next token, in (0, 1]
    (`sample_from`), and k for the accept tests in between, in [0, 1)."""
    gdev = generator.device if generator is not None else device
    u = torch.rand(batch, 2 * k + 1, generator=generator, device=gdev).to(device)
    u[:, :k] = 1.0 - u[:, :k]
    u[:, 2 * k] = 1.0 - u[:, 2 * k]
    return u


def _accepted_count(ok: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """How many drafts each row keeps: the length of the leading run of accepted ones, within num_drafts."""
    k = ok.shape[1]
    ok = ok & (torch.arange(k, device=ok.device) < num_drafts[:, None])
    return ok.long().cumprod(-1).sum(-1)


def accept_greedy(target_argmax: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0. `target_argmax [B, k+1]`, `drafts [B, k]`, `num_drafts [B]` ->
    (accepted [B], next_token [B]): keep drafts while they equal the target's argmax; the next token
    is the target's argmax right after the last kept one (the correction, or the bonus token)."""
    n = _accepted_count(target_argmax[:, : drafts.shape[1]] == drafts, num_drafts)
    return n, target_argmax.gather(1, n[:, None])[:, 0]


def accept_sampled(p: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor, q: torch.Tensor | None,
                   u_accept: torch.Tensor, u_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling. `p [B, k+1, V]` target probabilities; `drafts [B, k]`; `num_drafts [B]`;
    `q [B, k, V]` the draft's probabilities, or None for a deterministic proposer; `u_accept [B, k]`
    uniforms in [0, 1) and `u_next [B]` in (0, 1] (`draw_uniforms`). Returns (accepted [B], next_token [B]).

    p and q must come from the same temperature / top-k / top-p processing: the rule makes the output
    follow p, whatever p is, but only if q is the distribution the drafts were really drawn from.
    """
    k = drafts.shape[1]
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_d = torch.ones_like(p_d) if q is None else q.gather(-1, drafts[..., None])[..., 0]
    # Accept with probability min(1, p/q): u * q < p. Strict, so a draft the target gives 0 never passes.
    n = _accepted_count(u_accept * q_d < p_d, num_drafts)
    p_next = p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
    at = n.clamp(max=k - 1)[:, None]  # the rejected draft's position (clamped when all were accepted)
    if q is None:
        q_next = torch.zeros_like(p_next).scatter_(-1, drafts.gather(1, at), 1.0)
    else:
        q_next = q.gather(1, at[..., None].expand(-1, 1, q.shape[-1]))[:, 0]
    rejected = (n < num_drafts)[:, None]
    dist = torch.where(rejected, residual(p_next, q_next), p_next)
    return n, sample_from(dist, u_next)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test of observed `counts` against `probs` (same shape, any number of cells).

    Cells expected fewer than `min_expected` times are pooled into one (the chi-square approximation needs
    it). Returns (statistic, degrees of freedom, p-value); a small p-value says the samples do not follow
    `probs`.
    """
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = counts.sum()
    expected = probs / probs.sum() * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return math.inf, int(keep.sum()) - 1, 0.0  # samples where the distribution has no mass at all
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = int(obs.numel()) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p
