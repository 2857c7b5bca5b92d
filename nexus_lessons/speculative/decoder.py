"""`SpeculativeDecoder`: a draft proposes, the target verifies k tokens in one forward, nothing changes.

Batch-1 decode reads every weight of the target for one token; reading them once for k + 1 positions
costs about the same. So let something cheap guess k tokens (a small draft model, or prompt lookup),
check all guesses with one target forward, keep the ones the acceptance rule keeps (`rejection.py`):
greedy outputs are token-for-token those of plain `generate`, sampled outputs follow the target's
distribution exactly.

Two ways to run it:
* `cache="static"` (default): `static.StaticSpeculator`, every row in a fixed-shape buffer with its own
  length; on a GPU the draft phase and the verify phase replay as CUDA graphs, on a CPU it runs eagerly.
* `cache="paged"`: `batched.BatchedSpeculator` over a `PagedKVCache`, the path lesson 10's engine drives
  (rows come and go; verification through the paged extend kernel).
Both take one prompt or a batch (a list of prompts, or a left-padded tensor with its attention mask);
each row keeps its own number of drafts per step and stops on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..generate import _as_batch
from ..model import Transformer
from ..paged import PagedKVCache
from ..sampling import validate_sampling
from .batched import BatchedSpeculator
from .ngram import NGramSpeculator
from .static import StaticSpeculator, StepTimes

CAPACITY_STEP = 32  # the static buffers grow in these steps, so nearby lengths reuse one CUDA graph


@dataclass
class SpeculativeStats:
    """What the last `generate` call did. For one prompt the per-step lists are flat; for a batch they
    are one list per row (rows take different numbers of steps)."""

    accepted_per_step: list  # drafts kept at each step
    proposed_per_step: list  # drafts offered at each step (k, or fewer from n-gram lookup)
    acceptance_rate: float  # kept / offered, over all steps and rows
    alpha: float  # per-draft acceptance under the i.i.d. model: kept / (kept + rejections)
    tokens_per_step: float  # mean tokens a row gains per step (kept + 1)
    steps: int  # target verifications (forwards) run
    new_tokens: int
    draft_time_s: float
    verify_time_s: float
    total_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def summarise(accepted: list[list[int]], proposed: list[list[int]], single: bool, **times: float) -> SpeculativeStats:
    kept = sum(map(sum, accepted))
    offered = sum(map(sum, proposed))
    rejections = sum(a < p for ra, rp in zip(accepted, proposed) for a, p in zip(ra, rp))
    steps_all = sum(map(len, accepted))
    return SpeculativeStats(
        accepted_per_step=accepted[0] if single else accepted,
        proposed_per_step=proposed[0] if single else proposed,
        acceptance_rate=kept / offered if offered else 0.0,
        alpha=kept / (kept + rejections) if kept + rejections else 0.0,
        tokens_per_step=(kept + steps_all) / steps_all if steps_all else 0.0,
        steps=max(map(len, accepted), default=0),
        new_tokens=0, **times,
    )


class SpeculativeDecoder:
    """Speculative decoding with a draft model or an `NGramSpeculator` (prompt lookup).

    `num_speculative_tokens` (k) drafts per step. `use_graph` (default: the target is on CUDA) replays the
    static path's phases as CUDA graphs.
    """

    # Eager runs of the static path stop a row's drafting after a guess the draft itself gives less than
    # this probability (transformers' assisted generation does the same, at the same 0.4): an unlikely
    # draft costs a draft step and a verify position and is rarely kept. 0 drafts all k every step, which
    # is what a CUDA graph does (its shapes are fixed).
    draft_confidence: float = 0.4

    def __init__(self, target_model, draft, num_speculative_tokens: int = 5, *, use_graph: bool | None = None) -> None:
        if not isinstance(target_model, Transformer):
            raise TypeError(f"target_model must be a nexus_lessons Transformer (see from_hf), got {type(target_model).__name__}")
        if not isinstance(draft, (Transformer, NGramSpeculator)):
            raise TypeError(f"draft must be a Transformer or an NGramSpeculator, got {type(draft).__name__}")
        if isinstance(draft, Transformer):
            if draft.config.vocab_size != target_model.config.vocab_size:
                raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) != target vocabulary "
                                 f"({target_model.config.vocab_size}): they must share the tokenizer")
            if draft.device != target_model.device:
                raise ValueError(f"draft is on {draft.device} but the target is on {target_model.device}")
        if not isinstance(num_speculative_tokens, int) or isinstance(num_speculative_tokens, bool) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {num_speculative_tokens!r}")
        self.target, self.draft, self.k = target_model, draft, num_speculative_tokens
        self.use_graph = target_model.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and target_model.device.type != "cuda":
            raise ValueError("CUDA graphs need the models on a CUDA device")
        for model in (target_model, draft):
            if isinstance(model, Transformer) and model.device.type == "cuda":
                # As the engine does: a forward of <= 4 tokens (a draft step, verifying k <= 3) then runs
                # each projection as one GEMV kernel with the norm, activation and residual folded in.
                model.fuse_projections(fused_gemv=True)
        self._static: dict[tuple, StaticSpeculator] = {}
        self.last_stats: SpeculativeStats | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str = "nexus-tiny", draft: str | NGramSpeculator | None = None,
                        num_speculative_tokens: int = 5, *, device=None, dtype=None, **kwargs) -> "SpeculativeDecoder":
        """The shipped target and its distilled draft (`"nexus-tiny"` -> `"nexus-tiny-draft"`); `draft` may
        be another model name or folder, `"ngram"`, or an `NGramSpeculator`. The tokenizer is `.tokenizer`."""
        from ..loading import load_model

        target, tokenizer = load_model(name_or_path, device=device, dtype=dtype)
        if draft is None:
            if str(name_or_path) != "nexus-tiny":
                raise ValueError(f"no shipped draft for {name_or_path!r}: pass draft= a model name, folder or 'ngram'")
            draft = "nexus-tiny-draft"
        if draft == "ngram":
            draft = NGramSpeculator()
        if not isinstance(draft, NGramSpeculator):
            draft, _ = load_model(draft, device=target.device, dtype=target.dtype, tokenizer=False)
        dec = cls(target, draft, num_speculative_tokens, **kwargs)
        dec.tokenizer = tokenizer
        return dec

    def __repr__(self) -> str:
        d = self.draft if isinstance(self.draft, NGramSpeculator) else f"draft={self.draft.config.num_hidden_layers}-layer model"
        return f"SpeculativeDecoder(k={self.k}, {d}, device={self.target.device}, graphs={self.use_graph})"

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, cache: str = "static") -> torch.Tensor:
        """Like `nexus_lessons.generate`: LongTensor [B, T + n], prompts left-padded, prompt included; a row
        that emits eos is padded with `pad_token_id` (default the first eos id) after it."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        validate_sampling(temperature, top_k, top_p)
        if cache not in ("static", "paged"):
            raise ValueError(f"cache must be 'static' or 'paged', got {cache!r}")
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        ids, mask = _as_batch(self.target, input_ids, attention_mask, pad)
        if ids.device != self.target.device:
            raise ValueError(f"input_ids are on {ids.device} but the model is on {self.target.device}")
        vocab = self.target.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
        if max_new_tokens == 0:
            return ids.clone()
        B, T = ids.shape
        starts = [0] * B if mask is None else (T - mask.sum(1)).tolist()
        prompts = [row[s:] for row, s in zip(ids.tolist(), starts)]
        t0 = time.perf_counter()
        if cache == "static":
            outs, stats = self._generate_static(ids, starts, max_new_tokens, eos, (temperature, top_k, top_p), generator)
        else:
            outs, stats = self._generate_paged(prompts, max_new_tokens, eos, (temperature, top_k, top_p), generator)
        stats.total_time_s = time.perf_counter() - t0
        stats.new_tokens = sum(map(len, outs))
        self.last_stats = stats
        width = max(map(len, outs))
        new = torch.full((B, width), pad, dtype=torch.long)
        for i, row in enumerate(outs):
            new[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return torch.cat([ids, new.to(ids.device)], dim=1)

    # --- the static path -------------------------------------------------------------------------
    def _generate_static(self, ids, starts, max_new_tokens, eos, sampling, generator):
        B, T = ids.shape
        if T < 2:  # the draft phase feeds the last two slots: give one-token prompts a padding slot
            ids = torch.cat([torch.zeros_like(ids[:, :1]), ids], dim=1)
            starts = [s + 1 for s in starts]
        P = ids.shape[1]
        need = P + max_new_tokens + 2 * self.k + 1
        key = (B, *sampling)
        spec = self._static.get(key)
        if spec is None or spec.capacity < need:
            capacity = -(-need // CAPACITY_STEP) * CAPACITY_STEP
            spec = StaticSpeculator(self.target, self.draft, self.k, B, capacity, temperature=sampling[0],
                                    top_k=sampling[1], top_p=sampling[2], use_graph=self.use_graph)
            self._static[key] = spec
        spec.draft_confidence = self.draft_confidence
        spec.prefill(ids, torch.tensor(starts, device=ids.device), max_new_tokens, eos)
        times = StepTimes()
        spec.run(generator, times)
        outs = spec.outputs(P, max_new_tokens)
        accepted, proposed = spec.accepted()
        stats = summarise(accepted, proposed, B == 1, draft_time_s=times.draft_s, verify_time_s=times.verify_s,
                          total_time_s=0.0)
        return outs, stats

    # --- the paged path (what the engine drives) -------------------------------------------------
    def _generate_paged(self, prompts, max_new_tokens, eos, sampling, generator, block_size: int = 16):
        B, k = len(prompts), self.k
        per_row = -(-(max(map(len, prompts)) + max_new_tokens + k + 1) // block_size)
        cache = PagedKVCache.for_model(self.target, B * per_row, block_size)
        spec = BatchedSpeculator(self.target, self.draft, k)
        seq_ids = [cache.add_sequence() for _ in prompts]
        tokens = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        accepted: list[list[int]] = [[] for _ in prompts]
        proposed: list[list[int]] = [[] for _ in prompts]
        live = list(range(B))
        eos_set = set(eos)
        while live:
            new = spec.step(cache, [seq_ids[i] for i in live], [tokens[i] for i in live], temperature=sampling[0],
                            top_k=sampling[1], top_p=sampling[2], generator=generator)
            still = []
            for j, (i, got) in enumerate(zip(live, new)):
                accepted[i].append(spec.last_accepted[j])
                proposed[i].append(spec.last_proposed[j])
                got = got[: max_new_tokens - len(outs[i])]
                stop = next((m for m, t in enumerate(got) if t in eos_set), None)
                if stop is not None:
                    got = got[: stop + 1]
                outs[i] += got
                tokens[i] += got
                if stop is not None or len(outs[i]) >= max_new_tokens:
                    cache.free(seq_ids[i])
                    spec.free(seq_ids[i])
                else:
                    still.append(i)
            live = still
        stats = summarise(accepted, proposed, B == 1, draft_time_s=spec.draft_s, verify_time_s=spec.verify_s,
                          total_time_s=0.0)
        return outs, stats
