"""Prompt lookup (n-gram) speculation: guess that text repeats.

Take the last n tokens of a sequence, find their latest earlier occurrence in the prompt and the output,
and propose the k tokens that followed it; when the last n tokens never occurred before, try n - 1,
down to `min_n`. No model runs, so a draft costs nothing, and when the output copies the prompt
(editing code, quoting a document, filling a template) most guesses are right (Saxena 2023, "prompt
lookup decoding"; vLLM's ngram speculator).

The search is written over a padded token buffer with fixed shapes, so it runs vectorised over a batch
and inside the speculative decoder's CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NGramSpeculator:
    """Proposes up to k tokens per row by prompt lookup, longest n-gram first (n, n - 1, ..., min_n)."""

    def __init__(self, n: int = 3, *, min_n: int = 1) -> None:
        if not isinstance(n, int) or not isinstance(min_n, int) or not 1 <= min_n <= n:
            raise ValueError(f"need integers 1 <= min_n <= n, got n={n!r}, min_n={min_n!r}")
        self.n, self.min_n = n, min_n

    def __repr__(self) -> str:
        return f"NGramSpeculator(n={self.n}, min_n={self.min_n})"

    def propose_padded(self, seq: torch.Tensor, length: torch.Tensor, start: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts for rows of a token buffer. `seq [B, S]`: row b's tokens sit in slots
        `start[b] <= j < length[b]` (anything outside is ignored). Returns (drafts [B, k], num_drafts [B]):
        row b proposes `drafts[b, :num_drafts[b]]`, 0 to k tokens."""
        B, S = seq.shape
        dev = seq.device
        drafts = torch.zeros(B, k, dtype=torch.long, device=dev)
        num = torch.zeros(B, dtype=torch.long, device=dev)
        found_any = torch.zeros(B, dtype=torch.bool, device=dev)
        ahead = torch.arange(k, device=dev)
        for n in range(self.n, self.min_n - 1, -1):
            if n >= S:
                continue
            tail = seq.gather(1, (length[:, None] - n + torch.arange(n, device=dev)).clamp(min=0))  # [B, n]
            windows = seq.unfold(1, n, 1)  # [B, S - n + 1, n]: window j is seq[:, j:j+n]
            j = torch.arange(windows.shape[1], device=dev)
            # An earlier occurrence, inside the row, with at least one token after it.
            valid = (j >= start[:, None]) & (j < length[:, None] - n) & (length[:, None] - n >= start[:, None])
            match = (windows == tail[:, None, :]).all(-1) & valid
            last = torch.where(match, j, -1).amax(-1)  # the latest occurrence, -1 if none
            hit = (last >= 0) & ~found_any
            follow = last + n
            cand = seq.gather(1, (follow[:, None] + ahead).clamp(min=0, max=S - 1))
            count = (length - follow).clamp(min=0, max=k)
            drafts = torch.where(hit[:, None], cand, drafts)
            num = torch.where(hit, count, num)
            found_any |= hit
        drafts = torch.where(ahead < num[:, None], drafts, 0)
        return drafts, num

    def propose(self, token_lists: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        """Drafts for each token list (a row's prompt + output so far): up to k tokens each."""
        if not token_lists:
            return []
        drafts, num = self.propose_padded(*pad_left(token_lists), k)
        return [d[:m].tolist() for d, m in zip(drafts, num.tolist())]


def pad_left(token_lists: Sequence[Sequence[int]], device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists as `propose_padded` takes them: a left-padded [B, S] buffer, the lengths (S for every
    row) and each row's first real slot."""
    S = max(len(t) for t in token_lists)
    seq = torch.zeros(len(token_lists), S, dtype=torch.long)
    for i, t in enumerate(token_lists):
        seq[i, S - len(t):] = torch.as_tensor(list(t), dtype=torch.long)
    start = torch.tensor([S - len(t) for t in token_lists], dtype=torch.long)
    length = torch.full((len(token_lists),), S, dtype=torch.long)
    return seq.to(device), length.to(device), start.to(device)
