"""Speculative decoding with every piece of state on the device: fixed shapes, one CUDA graph per phase.

A step is k draft forwards, one target forward over the k + 1 candidate positions, the acceptance rule
and the bookkeeping. Written with tensors only (no `.item()`, no Python branch on a value), it can be
captured once and replayed: on a GPU the draft phase and the verify phase are each one graph launch, and
several steps run back to back with no host synchronisation. On a CPU the same code runs eagerly.

State, per row b of a batch (left-padded prompts):
  seq[b, start[b]:length[b]]   the row's tokens (prompt, then output)
  target cache                 K/V of slots < length - 1 (every token but the last)
  draft cache                  K/V of slots < length - 2: each draft phase re-feeds the last two tokens,
                               which covers both "the last accepted draft was never fed" (all k accepted)
                               and "it was" with one fixed shape (a 2-token forward)
Rolling back rejected drafts is just not advancing `length`: the next forwards overwrite those slots,
and the attention mask never shows a slot at or past a query's own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..sampling import logits_to_probs
from .ngram import NGramSpeculator
from .rejection import accept_greedy, accept_sampled, draw_uniforms, sample_from

MAX_EOS = 8


class SlotKVCache:
    """A static KV cache for B rows, [B, Hkv, S, D] per layer, written at per-row slots held on the device.

    `slot[b]` is where row b's next forward starts writing, `start[b]` its first real slot (left padding
    before it). A forward of T tokens writes slots slot..slot+T-1 of every row; query t of row b sees
    the real slots up to its own. The owner moves `slot` (the cache never does): that is the rollback.
    `keys_in_use`, when set, bounds the slots attention reads (eager runs know it; a CUDA graph reads all).

    Every forward here is a few tokens, so its cost is a count of small kernels. The write positions and
    the additive mask are built once per forward for all layers, and attention is three ops per layer,
    the query heads of one KV head stacked as rows of one matrix (no copy of K/V per query head, as
    grouped-query SDPA makes).
    """

    def __init__(self, model, batch_size: int, max_seq_len: int) -> None:
        c, dev = model.config, model.device
        self.num_kv_heads = c.num_key_value_heads
        self.group = c.num_attention_heads // c.num_key_value_heads
        shape = (batch_size, c.num_key_value_heads, max_seq_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype, device=dev) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=dev) for _ in range(c.num_hidden_layers)]
        self.slot = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self._keys = torch.arange(max_seq_len, device=dev)
        # flat index of slot 0 of each (row, KV head) run in a layer's [B * Hkv * S, D] view
        self._runs = torch.arange(batch_size * c.num_key_value_heads, device=dev).view(batch_size, -1, 1) * max_seq_len
        self.keys_in_use: int | None = None

    def begin_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"this cache holds {self.batch_size} rows, got a batch of {B}")
        idx = self.slot[:, None] + self._keys[:T]  # [B, T] write slots
        self._write = (self._runs + idx[:, None]).flatten()  # [B * Hkv * T] rows of the flat view
        j = self._keys[: self.keys_in_use]
        visible = (j >= self.start[:, None, None]) & (j <= idx[..., None])
        visible |= j == idx[..., None]  # a padding query sees itself: no fully masked row (NaN)
        mask = torch.where(visible, 0.0, float("-inf")).to(self.k[0].dtype)  # [B, T, S]
        # rows of a KV head's score matrix are (query head in the group, token): the mask repeats per head
        Hkv, S = self.num_kv_heads, j.shape[0]
        self._mask = mask[:, None, None].expand(B, Hkv, self.group, T, S).reshape(B * Hkv, self.group * T, S)
        return (idx - self.start[:, None]).clamp(min=0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, Hq, T, D = q.shape
        kc, vc = self.k[layer], self.v[layer]
        kc.view(-1, D).index_copy_(0, self._write, k.reshape(-1, D))
        vc.view(-1, D).index_copy_(0, self._write, v.reshape(-1, D))
        S, rows = self._mask.shape[-1], B * self.num_kv_heads
        keys, values = kc[:, :, :S].reshape(rows, S, D), vc[:, :, :S].reshape(rows, S, D)  # views
        scores = torch.baddbmm(self._mask, q.reshape(rows, self.group * T, D), keys.transpose(1, 2), alpha=D ** -0.5)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, values).view(B, Hq, T, D)


@dataclass
class StepTimes:
    """Seconds spent drafting and verifying, summed over the steps of one generation."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    _events: list = field(default_factory=list, repr=False)


class StaticSpeculator:
    """The fixed-shape speculative loop for B rows and one sampling setting (see the module docstring).

    Built by `SpeculativeDecoder` and reused across calls of the same batch size; `capacity` is the
    longest row (prompt + output + 2k + 1 slack slots) it can hold.
    """

    def __init__(self, target, draft, k: int, batch_size: int, capacity: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, use_graph: bool = False) -> None:
        self.target, self.draft, self.k, self.B, self.capacity = target, draft, k, batch_size, capacity
        self.sampling = (temperature, top_k, top_p)
        self.greedy = temperature == 0
        dev = target.device
        self.device = dev
        self.target_cache = SlotKVCache(target, batch_size, capacity)
        self.draft_cache = None if isinstance(draft, NGramSpeculator) else SlotKVCache(draft, batch_size, capacity)
        B, V = batch_size, target.config.vocab_size
        self.seq = torch.zeros(B, capacity + k + 1, dtype=torch.long, device=dev)
        self.length = torch.zeros(B, dtype=torch.long, device=dev)
        self.limit = torch.zeros(B, dtype=torch.long, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=dev)  # a fixed buffer: graphs read it
        self.drafts = torch.zeros(B, k, dtype=torch.long, device=dev)
        self.num_drafts = torch.zeros(B, dtype=torch.long, device=dev)
        self.q = None if self.greedy or self.draft_cache is None else torch.zeros(B, k, V, device=dev)
        self.noise = torch.rand(B, 2 * k + 1, device=dev)  # u_draft [k], u_accept [k], u_next [1]
        self.history = torch.full((capacity + 1, B), -1, dtype=torch.long, device=dev)
        self.proposed = torch.zeros_like(self.history)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self._offsets = torch.arange(k + 1, device=dev)
        self.use_graph = use_graph
        self.graphs: tuple | None = None
        self.draft_confidence = 0.0  # eager runs only: see SpeculativeDecoder.draft_confidence

    # --- one step, in two phases ----------------------------------------------------------------
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits_to_probs(logits, *self.sampling)

    def draft_phase(self) -> None:
        L, k = self.length, self.k
        if self.draft_cache is None:
            d, n = self.draft.propose_padded(self.seq, L, self.target_cache.start, k)
            self.drafts.copy_(d)
            self.num_drafts.copy_(n)
            return
        cache = self.draft_cache
        cache.slot.copy_(L - 2)
        x = self.seq.gather(1, (L - 2)[:, None] + self._offsets[:2])
        self.num_drafts.fill_(k)
        unsure = torch.zeros_like(self.done)
        for i in range(k):
            logits = self.draft(x, cache=cache)[:, -1]
            probs = self._probs(logits) if not self.greedy else None
            if self.greedy:
                tok = logits.argmax(-1)
            else:
                self.q[:, i] = probs
                tok = sample_from(probs, self.noise[:, i])
            self.drafts[:, i] = tok
            if not self.use_graph and self.draft_confidence > 0:  # stop a row once the draft is unsure
                confidence = (probs if probs is not None else torch.softmax(logits.float(), -1)).amax(-1)
                self.num_drafts.copy_(torch.where(unsure, self.num_drafts, i + 1))
                unsure |= confidence < self.draft_confidence
                if bool(unsure.all()):
                    break
            cache.slot.copy_(L - 1 + i + 1)
            x = tok[:, None]

    def verify_phase(self) -> None:
        """One target forward over each row's newest token and its drafts, the rule, the bookkeeping.
        A graph verifies all k positions; an eager run only up to the longest row's drafts."""
        L = self.length
        m = self.k if self.use_graph else int(self.num_drafts.max())
        drafts = self.drafts[:, :m]
        self.target_cache.slot.copy_(L - 1)
        x = torch.cat([self.seq.gather(1, (L - 1)[:, None]), drafts], dim=1)  # [B, m + 1]
        logits = self.target(x, cache=self.target_cache)
        if self.greedy:
            n, nxt = accept_greedy(logits.argmax(-1), drafts, self.num_drafts)
        elif m == 0:
            n = torch.zeros_like(self.num_drafts)
            nxt = sample_from(self._probs(logits[:, 0]), self.noise[:, 2 * self.k])
        else:
            u, k = self.noise, self.k
            q = None if self.q is None else self.q[:, :m]
            n, nxt = accept_sampled(self._probs(logits), drafts, self.num_drafts, q, u[:, k:k + m], u[:, 2 * k])
        j = self._offsets[: m + 1]
        padded = torch.cat([drafts, torch.zeros_like(self.drafts[:, :1])], dim=1)
        new = torch.where(j < n[:, None], padded, nxt[:, None])  # kept drafts, then the target's token
        self.seq.scatter_(1, L[:, None] + j, new)  # slots past length + n are rewritten next step
        live = ~self.done
        taken = (j <= n[:, None]) & live[:, None]
        hit_eos = ((new[..., None] == self.eos).any(-1) & taken).any(-1)
        self.history.index_copy_(0, self.step_index, torch.where(live, n, -1)[None])
        self.proposed.index_copy_(0, self.step_index, torch.where(live, self.num_drafts, -1)[None])
        self.step_index.add_(1).clamp_(max=self.history.shape[0] - 1)
        self.length.add_(torch.where(live, n + 1, 0))
        self.done |= hit_eos | (self.length >= self.limit)

    # --- driving it ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, start: torch.Tensor, max_new_tokens: int, eos: list[int]) -> None:
        """ids [B, P] left-padded (P >= 2), start [B] the first real column of each row."""
        B, P = ids.shape
        if P + max_new_tokens + 2 * self.k + 1 > self.capacity:
            raise ValueError(f"{P} + {max_new_tokens} tokens do not fit this speculator's capacity {self.capacity}")
        self.seq.zero_()
        self.seq[:, :P] = ids
        for cache in (self.target_cache, self.draft_cache):
            if cache is not None:
                cache.start.copy_(start)
                cache.slot.zero_()
        self._bound_keys(P)
        self.target(ids[:, : P - 1], cache=self.target_cache)  # every prompt token but the last
        if self.draft_cache is not None and P > 2:
            self.draft(ids[:, : P - 2], cache=self.draft_cache)  # the first draft phase feeds the last two
        self.length.fill_(P)
        self.limit.fill_(P + max_new_tokens)
        self.done.zero_()
        if len(eos) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} eos ids, got {len(eos)}")
        self.eos.fill_(-1)
        self.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        self.history.fill_(-1)
        self.proposed.fill_(-1)
        self.step_index.zero_()

    def _fill_noise(self, generator: torch.Generator | None) -> None:
        if self.greedy:
            return
        self.noise.copy_(draw_uniforms(self.B, self.k, generator, self.device), non_blocking=True)

    def _capture(self) -> None:
        """Warm up off the capture stream, put the state back, then record each phase once."""
        self._bound_keys(None)  # a graph is recorded once, so it reads every slot
        saved = [t.clone() for t in (self.length, self.done, self.step_index, self.history, self.proposed)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.draft_phase()
                self.verify_phase()
        torch.cuda.current_stream().wait_stream(stream)
        for dst, src in zip((self.length, self.done, self.step_index, self.history, self.proposed), saved):
            dst.copy_(src)
        graphs = (torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[0]):
            self.draft_phase()
        with torch.cuda.graph(graphs[1]):
            self.verify_phase()
        # Capture ran nothing, but the warm-up moved the caches' slots; the phases set them anew anyway.
        self.graphs = graphs

    @torch.no_grad()
    def run(self, generator: torch.Generator | None = None, times: StepTimes | None = None) -> None:
        """Steps until every row is done. Between host checks it runs as many steps as the furthest row
        needs at best (k + 1 tokens a step), so no step runs after the last row finishes by length."""
        if self.use_graph and self.graphs is None:
            self._capture()
        while True:
            left = torch.where(self.done, 0, self.limit - self.length).max().item()  # the one sync per round
            if left <= 0:
                break
            for _ in range(max(1, math.ceil(left / (self.k + 1)))):
                self._fill_noise(generator)
                self._one_step(times)
        if times is not None and times._events:
            torch.cuda.synchronize()
            for a, b, c in times._events:
                times.draft_s += a.elapsed_time(b) / 1e3
                times.verify_s += b.elapsed_time(c) / 1e3
            times._events.clear()

    def _bound_keys(self, n: int | None) -> None:
        for cache in (self.target_cache, self.draft_cache):
            if cache is not None:
                cache.keys_in_use = n

    def _one_step(self, times: StepTimes | None) -> None:
        if self.use_graph:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if times is not None else None
            if ev:
                ev[0].record()
            self.graphs[0].replay()
            if ev:
                ev[1].record()
            self.graphs[1].replay()
            if ev:
                ev[2].record()
                times._events.append(ev)
            return
        t0 = time.perf_counter()
        # Eager: attention need not read past the furthest slot this step writes.
        self._bound_keys(min(int(self.length.max()) + self.k, self.capacity))
        self.draft_phase()
        t1 = time.perf_counter()
        self.verify_phase()
        if times is not None:
            times.draft_s += t1 - t0
            times.verify_s += time.perf_counter() - t1

    def outputs(self, prompt_width: int, max_new_tokens: int) -> list[list[int]]:
        """Each row's generated tokens (at most max_new_tokens; through the first eos if one came)."""
        eos = set(self.eos.tolist()) - {-1}
        rows = []
        for seq, n in zip(self.seq.tolist(), self.length.tolist()):
            out = seq[prompt_width:min(n, prompt_width + max_new_tokens)]
            for i, t in enumerate(out):
                if t in eos:
                    out = out[: i + 1]
                    break
            rows.append(out)
        return rows

    def accepted(self) -> tuple[list[list[int]], list[list[int]]]:
        """(accepted, proposed) per row, one entry per step the row took part in."""
        steps = int(self.step_index.item())
        acc, prop = self.history[:steps].T.tolist(), self.proposed[:steps].T.tolist()
        return [[a for a in row if a >= 0] for row in acc], [[p for p in row if p >= 0] for row in prop]
