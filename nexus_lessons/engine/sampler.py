"""The next token of every row at once, on the device: greedy, temperature, top-k, top-p, per-request seeds.

Each row has its own parameters (tensors [S]), so the whole batch is a handful of batched ops, never a
Python loop over rows. Randomness is counter-based: the noise for vocabulary entry v of a request's n-th
output token is a hash of (seed, n, v), so a seeded request draws the same tokens whatever else is in
the batch, however the steps were chunked, and after a preemption. The draw is the exponential race
(equivalent to the Gumbel-max trick): token = argmax_v p_v / E_v with E_v ~ Exp(1) independent, which
picks v with probability exactly p_v.
"""

from __future__ import annotations

import torch

from ..cuda_graph import argmax_two_stage

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so every product of a 32-bit value fits in int64 without overflow.
_MUL = (0x7FEB352D, 0x1B873593, 0x5BD1E995)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply rounds) on int64 tensors holding values in [0, 2**32)."""
    for m in _MUL:
        x = x ^ (x >> 16)
        x = (x * m) & _MASK32
    return x ^ (x >> 15)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) float32 [S, V], a pure function of (seed, step, vocabulary index): 24 random bits each."""
    s = seeds.long()
    row = hash32((s & _MASK32) ^ hash32(((s >> 32) & _MASK32) ^ hash32(steps.long() & _MASK32)))
    v = torch.arange(vocab_size, device=seeds.device)
    bits = hash32((row[:, None] + v * 0x9E3779B9) & _MASK32)
    return ((bits >> 8).float() + 0.5) * (1.0 / 2**24)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    all_greedy: bool,
    any_top_k_or_p: bool,
) -> torch.Tensor:
    """Token ids [S] from logits [S, V]; rows with temperature 0 take the argmax.

    `top_k` [S] int64 (V or more: off), `top_p` [S] float32 (1.0: off), `seeds`, `steps` [S] int64 (the
    step is the number of output tokens the request has so far). The two flags are host facts the caller
    knows, so that a greedy batch costs one argmax and a temperature-only batch needs no sort.
    """
    greedy = argmax(logits)
    if all_greedy:
        return greedy
    V = logits.shape[-1]
    scaled = logits.float() / temperature.clamp(min=1e-6)[:, None]
    noise = -torch.log(uniform_noise(seeds, steps, V))  # Exp(1) per (row, vocabulary entry)
    if any_top_k_or_p:
        scaled, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)
        scaled = scaled.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = scaled.softmax(dim=-1)
        # Drop a token when those ranked above it already hold top_p (the first always stays).
        scaled = scaled.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], float("-inf"))
        noise = noise.gather(1, order)
    probs = scaled.softmax(dim=-1)
    choice = (probs / noise).argmax(dim=-1)
    drawn = order.gather(1, choice[:, None])[:, 0] if any_top_k_or_p else choice
    return torch.where(temperature == 0, greedy, drawn)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)`; on a GPU as two reductions (`cuda_graph.argmax_two_stage`: one program reading a
    32k-entry row alone is slow there), with the same ties."""
    if logits.device.type != "cuda":
        return logits.argmax(-1)
    return argmax_two_stage(logits)[:, 0]
