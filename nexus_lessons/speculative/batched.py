"""Speculative decoding for a changing batch of sequences in a `PagedKVCache`: the path an engine drives.

Lesson 10's engine keeps each running request as a sequence of the target's paged cache and, once per
iteration, calls

    new_tokens = spec.step(cache, seq_ids, token_lists, temperature=..., top_k=..., top_p=..., generator=g)

where `token_lists[i]` is sequence `seq_ids[i]`'s whole token list (prompt + output so far). The step
1. proposes up to k tokens per row: the draft model over its own paged cache (it feeds each row the
   tokens it has not seen, then k - 1 single-token steps), or n-gram lookup over the row's tokens;
2. verifies them with one target forward over the paged cache: each row feeds its tokens not yet
   cached (normally just the last one) plus its drafts, left-padded into one batch, so the extend
   kernel (`paged_prefill_attention`) runs causally over every row's new tokens at once;
3. accepts per row by the rule in `rejection.py` (each row keeps its own number of drafts);
4. rolls back: each target sequence is truncated to its kept tokens (the draft's cache is rolled back
   lazily, at its next proposal, to the longest prefix it shares with the row's tokens).
It returns each row's new tokens (1 to k + 1). After it, the target cache holds K/V for every token of
the row but the newest, the invariant the next step starts from. The engine appends the tokens, cuts at
eos / max_tokens, and calls `spec.free(seq_id)` when it frees or preempts a sequence. Before the step it
must make room for k + 1 more tokens per row (`cache.can_append({seq_id: k + 1, ...})`); if the pool is
short, the forward raises `OutOfBlocksError` before changing anything.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from ..generate import left_pad
from ..paged import PagedKVCache
from ..sampling import logits_to_probs, validate_sampling
from .ngram import NGramSpeculator, pad_left
from .rejection import accept_sampled, draw_uniforms, sample_from

Setting = tuple[float, "int | None", "float | None"]


def _per_row(value, B: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {B}")
        return list(value)
    return [value] * B


def row_settings(B: int, temperature, top_k, top_p) -> list[Setting]:
    """One (temperature, top_k, top_p) per row, from scalars or per-row sequences, each validated."""
    rows = list(zip(_per_row(temperature, B, "temperature"), _per_row(top_k, B, "top_k"), _per_row(top_p, B, "top_p")))
    for s in set(rows):
        validate_sampling(*s)
    return rows


def row_probs(logits: torch.Tensor, settings: Sequence[Setting]) -> torch.Tensor:
    """float32 probabilities [B, ..., V]; a greedy row (temperature 0) becomes one-hot at its argmax, which
    the acceptance rule turns into exact greedy verification."""
    def probs(x: torch.Tensor, s: Setting) -> torch.Tensor:
        if s[0] == 0:
            return F.one_hot(x.argmax(-1), x.shape[-1]).float()
        return logits_to_probs(x, *s)

    if len(set(settings)) == 1:
        return probs(logits, settings[0])
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for s in set(settings):
        rows = torch.tensor([i for i, r in enumerate(settings) if r == s], device=logits.device)
        out[rows] = probs(logits[rows], s)
    return out


class DraftModelProposer:
    """A draft model proposing for sequences that come and go, over its own `PagedKVCache`.

    It remembers, per key, the tokens whose K/V it holds; a proposal truncates that to the longest
    prefix shared with the row's current tokens (so rejected drafts roll back here) and feeds the rest.
    """

    def __init__(self, draft, *, num_blocks: int, block_size: int = 16) -> None:
        self.model = draft
        self.cache = PagedKVCache.for_model(draft, num_blocks, block_size)
        self._held: dict[Hashable, tuple[int, list[int]]] = {}  # key -> (draft seq id, tokens cached)

    def free(self, key: Hashable) -> None:
        if key in self._held:
            self.cache.free(self._held.pop(key)[0])

    @torch.no_grad()
    def propose(self, keys: Sequence[Hashable], token_lists: Sequence[Sequence[int]], k: int,
                settings: Sequence[Setting], u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(drafts [B, k], q [B, k, V]): k tokens per row drawn from the draft's (processed) distributions
        q with the uniforms `u [B, k]` (one-hot q for greedy rows)."""
        feeds, seq_ids = [], []
        for key, tokens in zip(keys, token_lists):
            sid, held = self._held.get(key) or (self.cache.add_sequence(), [])
            same = 0
            for a, b in zip(held, tokens[:-1]):  # keep at most all but the last: its logits are needed
                if a != b:
                    break
                same += 1
            self.cache.truncate(sid, same)
            feeds.append(list(tokens[same:]))
            seq_ids.append(sid)
            self._held[key] = (sid, list(tokens))
        ids, mask = left_pad(feeds, device=self.model.device)
        self.cache.bind(seq_ids)
        logits = self.model(ids, None if bool(mask.all()) else mask, cache=self.cache)[:, -1]
        drafts, qs = [], []
        for i in range(k):
            q = row_probs(logits, settings)
            tok = sample_from(q, u[:, i]) if u is not None else q.argmax(-1)
            drafts.append(tok)
            qs.append(q)
            if i + 1 < k:
                logits = self.model(tok[:, None], cache=self.cache)[:, -1]
        drafts_t = torch.stack(drafts, 1)
        for key, row in zip(keys, drafts_t[:, : k - 1].tolist()):
            self._held[key][1].extend(row)
        return drafts_t, torch.stack(qs, 1)


class BatchedSpeculator:
    """One speculative step for a batch of sequences of a paged target cache (see the module docstring).

    `draft` is a draft model (it gets its own paged cache, with as many blocks as the target's pool,
    built at the first step) or an `NGramSpeculator`. After each step, `last_accepted[i]` and
    `last_proposed[i]` say how many drafts row i kept and was offered; `draft_s` / `verify_s` sum the time.
    """

    def __init__(self, target, draft, num_speculative_tokens: int = 5) -> None:
        self.target, self.draft, self.k = target, draft, num_speculative_tokens
        self.proposer: DraftModelProposer | None = None
        self.last_accepted: list[int] = []
        self.last_proposed: list[int] = []
        self.draft_s = self.verify_s = 0.0

    def free(self, seq_id: Hashable) -> None:
        """Forget a sequence's draft state (call when the engine frees or preempts the sequence)."""
        if self.proposer is not None:
            self.proposer.free(seq_id)

    def _sync(self) -> None:
        if self.target.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def step(self, cache: PagedKVCache, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]], *,
             temperature=0.0, top_k=None, top_p=None, generator: torch.Generator | None = None) -> list[list[int]]:
        """Propose, verify in one target forward, accept, roll back; returns each row's new tokens.

        `temperature`, `top_k`, `top_p` are one value for all rows or one per row.
        """
        B, k, dev = len(seq_ids), self.k, self.target.device
        if B != len(token_lists) or B == 0:
            raise ValueError(f"need one token list per sequence, got {B} sequences and {len(token_lists)} lists")
        if any(len(t) == 0 for t in token_lists):
            raise ValueError("empty token list: every row needs at least its prompt")
        settings = row_settings(B, temperature, top_k, top_p)
        sampled = any(s[0] > 0 for s in settings)
        noise = draw_uniforms(B, k, generator, dev) if sampled else None
        t0 = time.perf_counter()
        # 1. propose
        if isinstance(self.draft, NGramSpeculator):
            drafts, num = self.draft.propose_padded(*pad_left(token_lists, dev), k)
            q = None
        else:
            if self.proposer is None:
                self.proposer = DraftModelProposer(self.draft, num_blocks=cache.num_blocks, block_size=cache.block_size)
            drafts, q = self.proposer.propose(seq_ids, token_lists, k, settings, None if noise is None else noise[:, :k])
            num = torch.full((B,), k, dtype=torch.long, device=dev)
        self._sync()
        t1 = time.perf_counter()
        # 2. verify: each row feeds what the target has not cached (normally its last token) + its drafts
        num_l = num.tolist()
        feeds = []
        for sid, tokens, d, m in zip(seq_ids, token_lists, drafts.tolist(), num_l):
            held = cache.num_tokens(sid)
            if held >= len(tokens):  # the last token's logits are needed: feed it again
                cache.truncate(sid, len(tokens) - 1)
                held = len(tokens) - 1
            feeds.append(list(tokens[held:]) + d[:m])
        ids, mask = left_pad(feeds, device=dev)
        cache.bind(list(seq_ids))
        logits = self.target(ids, None if bool(mask.all()) else mask, cache=cache)
        T = ids.shape[1]
        at = (T - 1 - num[:, None] + torch.arange(k + 1, device=dev)).clamp(max=T - 1)  # right-aligned
        logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))  # [B, k + 1, V]
        # 3. accept (greedy rows are one-hot distributions: the same rule is then exact greedy)
        p = row_probs(logits, settings)
        u_acc = noise[:, k:2 * k] if noise is not None else torch.zeros(B, k, device=dev)
        u_next = noise[:, 2 * k] if noise is not None else torch.ones(B, device=dev)
        n, nxt = accept_sampled(p, drafts, num, q, u_acc, u_next)
        # 4. roll back the target: keep the row's tokens and its accepted drafts
        out = []
        for sid, tokens, d, a, t in zip(seq_ids, token_lists, drafts.tolist(), n.tolist(), nxt.tolist()):
            cache.truncate(sid, len(tokens) + a)
            out.append(d[:a] + [t])
        self._sync()
        self.last_accepted, self.last_proposed = n.tolist(), num_l
        self.draft_s += t1 - t0
        self.verify_s += time.perf_counter() - t1
        return out

