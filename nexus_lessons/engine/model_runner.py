"""Turns a scheduled batch into one forward and one sampling step on the device, without waiting for it.

Per step the host writes everything the forward needs into two pinned buffers (token ids, positions,
slots, sampling parameters as int64; block tables, lengths, query offsets and float parameters as
int32 bits) and copies each to the device in one transfer. What does not change between steps lives in
persistent per-row tables (vLLM's "persistent batch"): each running sequence owns a row holding its
block table and sampling parameters, updated only when a block is added. So the per-step host work is
a few vectorised numpy gathers, not a loop that rebuilds tables.

A decode step whose batch fits a captured size replays a CUDA graph. The graphs were recorded once per
size of a ladder (1, 2, 4, 8, 16, 32, ...) over fixed views of the same device buffers, reading the
PagedKVCache's own pools; a smaller batch is padded to the next size with rows that write a reserved
scratch slot. Other steps (prefill chunks, mixed, larger batches, `enforce_eager`) run eagerly.

`launch` returns at once with the sampled tokens still on the device (their copy to the host is
queued); the engine reads them one step later, so the host prepares step t+1 while the GPU runs step t.
A decode row whose newest token is still on the device takes it from the previous step's tokens there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..paged import PagedKVCache
from .forward_batch import ForwardBatch
from .sampler import sample
from .scheduler import ScheduledBatch
from .sequence import Sequence


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a CUDA graph: 1, 2, 4, 8, then every multiple of 16 (nano-vllm's ladder)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


@dataclass
class StepHandle:
    """A launched step: its batch, the sampled tokens on the device and their copy on the way to the host."""

    batch: ScheduledBatch
    tokens: torch.Tensor  # [S] int64 on the device, one per sampling row
    host: torch.Tensor  # the same, arriving in (pinned) host memory
    event: torch.cuda.Event | None
    graph: bool

    def token_ids(self) -> list[int]:
        """The one device-to-host synchronisation of a step."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enforce_eager: bool) -> None:
        self.model, self.cache = model, cache
        self.device = cache.device
        self.vocab_size = model.config.vocab_size
        self.block_size = bs = cache.block_size
        self.max_num_seqs = max_num_seqs
        self.width = -(-max_model_len // bs)  # block-table columns: a fixed max context for graphs
        on_gpu = self.device.type == "cuda"
        # Persistent per-row state, on the host.
        R = max_num_seqs
        self.tables = np.zeros((R, self.width), dtype=np.int32)
        self.num_synced = [0] * R  # block ids copied into each row so far
        self.temperature = np.zeros(R, dtype=np.float32)
        self.top_p = np.ones(R, dtype=np.float32)
        self.top_k = np.zeros(R, dtype=np.int64)
        self.seed = np.zeros(R, dtype=np.int64)
        self.greedy = np.ones(R, dtype=bool)
        self.free_rows = list(range(R - 1, -1, -1))
        # Staging: one int64 and one int32 device buffer, filled from alternating pinned host buffers.
        T = max_num_batched_tokens
        n64, n32 = 3 * max(T, R) + 6 * R, 4 * R + 1 + R * self.width
        self.dev64 = torch.zeros(n64, dtype=torch.int64, device=self.device)
        self.dev32 = torch.zeros(n32, dtype=torch.int32, device=self.device)
        self.host64 = [torch.zeros(n64, dtype=torch.int64, pin_memory=on_gpu) for _ in range(2)]
        self.host32 = [torch.zeros(n32, dtype=torch.int32, pin_memory=on_gpu) for _ in range(2)]
        self.host_tokens = [torch.zeros(R, dtype=torch.int64, pin_memory=on_gpu) for _ in range(2)]
        self.turn = 0
        self.fb = ForwardBatch(cache)
        self.graphs: dict[int, tuple] = {}  # batch size -> (replay, logits, ForwardBatch)
        self._pool = None  # the graphs' shared memory pool
        self.scratch_seq: int | None = None
        if on_gpu and not enforce_eager and model.config.sliding_window is None:
            self.capture_graphs(graph_batch_sizes(max_num_seqs))

    # --- per-row state --------------------------------------------------------------------------------
    def _take_row(self, seq: Sequence) -> None:
        row = seq.row = self.free_rows.pop()
        p = seq.params
        self.temperature[row], self.top_p[row], self.greedy[row] = p.temperature, p.top_p, p.greedy
        self.top_k[row] = self.vocab_size if p.top_k == -1 else p.top_k
        self.seed[row] = seq.seed
        self.num_synced[row] = 0

    def release(self, seq: Sequence) -> None:
        """The sequence no longer holds blocks (finished, aborted or preempted): free its row."""
        if seq.row is not None:
            self.free_rows.append(seq.row)
            seq.row = None

    def _sync_row(self, seq: Sequence) -> int:
        """Copy block ids the cache appended since the last step into the row; returns the row."""
        if seq.row is None:
            self._take_row(seq)
        row = seq.row
        blocks = self.cache.tables.seqs[seq.cache_seq].blocks
        done = self.num_synced[row]
        if len(blocks) > done:
            self.tables[row, done:len(blocks)] = blocks[done:]
            self.num_synced[row] = len(blocks)
        return row

    # --- one step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def launch(self, batch: ScheduledBatch, prev: StepHandle | None) -> StepHandle:
        seqs, counts_l = batch.seqs, batch.num_new
        B, nd = len(seqs), batch.num_decode
        rows = np.fromiter((self._sync_row(s) for s in seqs), dtype=np.int64, count=B)
        counts = np.asarray(counts_l, dtype=np.int64)
        ends = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=B)
        starts = ends - counts
        N = int(counts.sum())
        starts_l = starts.tolist()
        ids: list[int] = []
        pending: list[tuple[int, int]] = []  # (row, index in the previous step's tokens)
        for i, (s, a) in enumerate(zip(seqs[:nd], starts_l)):
            if a < len(s.token_ids):
                ids.append(s.token_ids[a])
            else:  # its newest token was sampled by the step in flight: still on the device
                ids.append(0)
                pending.append((i, s.pending_index))
        for s, a, n in zip(seqs[nd:], starts_l[nd:], counts_l[nd:]):
            ids.extend(s.token_ids[a:a + n])
        if pending and prev is None:
            raise RuntimeError("a pending token with no step in flight")
        sampled = np.asarray(batch.samples, dtype=bool)
        srows = rows[sampled]
        S = len(srows)
        steps = np.fromiter((s.num_outputs for s, x in zip(seqs, batch.samples) if x), dtype=np.int64, count=S)

        graph_size = self._graph_size(B) if nd == B and S == B else None
        Bp = graph_size or B
        pos = np.repeat(starts, counts) + np.arange(N) - np.repeat(np.cumsum(counts) - counts, counts)
        tok_rows = np.repeat(rows, counts)
        slots = self.tables[tok_rows, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        lens = ends.astype(np.int32)
        width = self.width if graph_size else -(-int(ends.max()) // self.block_size)
        tables = self.tables[rows, :width]
        qsl = np.concatenate([[0], np.cumsum(counts[nd:])]).astype(np.int32)
        logits_idx = (np.cumsum(counts) - 1)[sampled]
        if graph_size and Bp > B:  # padding rows: token 0 at position 0 into the scratch slot, one key
            pad = Bp - B
            ids += [0] * pad
            pos, slots = np.pad(pos, (0, pad)), np.pad(slots, (0, pad), constant_values=self.scratch_slot)
            lens = np.pad(lens, (0, pad), constant_values=1)
            tables = np.pad(tables, ((0, pad), (0, 0)), constant_values=self.scratch_block)
        p_rows = np.asarray([i for i, _ in pending], dtype=np.int64)
        p_src = np.asarray([j for _, j in pending], dtype=np.int64)
        d64, d32 = self._upload(
            [np.asarray(ids, dtype=np.int64), pos, slots, logits_idx, p_rows, p_src,
             self.top_k[srows], self.seed[srows], steps],
            [lens, tables.reshape(-1), qsl, self.temperature[srows].view(np.int32), self.top_p[srows].view(np.int32)])
        input_ids, positions, slot_mapping, logits_idx_d, p_rows_d, p_src_d, top_k, seeds, steps_d = d64
        lens_d, tables_d, qsl_d, temp_d, top_p_d = d32
        if pending:  # the newest tokens of these rows were sampled by the step in flight
            input_ids.index_copy_(0, p_rows_d, prev.tokens.index_select(0, p_src_d))

        if graph_size:
            replay, logits, _ = self.graphs[graph_size]
            replay()
            logits = logits[:B]
        else:
            self.fb.set(positions=positions, slot_mapping=slot_mapping, num_decode=nd,
                        block_tables=tables_d.view(B, width), context_lens=lens_d, query_start_loc=qsl_d,
                        max_query_len=int(counts[nd:].max()) if nd < B else 1,
                        max_context_len=int(ends.max()), mean_context_len=float(ends.mean()),
                        quant_plan=self._quant_plan(seqs, starts_l, counts_l))
            if S == N:  # every token samples (a decode batch): the whole forward's logits
                logits = self.model(input_ids[None], cache=self.fb)[0]
            else:  # the lm_head only for the last token of each chunk that reaches its sequence's end
                hidden = self.model.hidden_states(input_ids[None], cache=self.fb)[0]
                logits = self.model.lm_head(hidden.index_select(0, logits_idx_d)) if S else None
        if S:
            greedy = bool(self.greedy[srows].all())
            top_cut = not greedy and bool(((self.top_k[srows] < self.vocab_size) | (self.top_p[srows] < 1)).any())
            tokens = sample(logits, temp_d.view(torch.float32), top_k, top_p_d.view(torch.float32), seeds, steps_d,
                            all_greedy=greedy, any_top_k_or_p=top_cut)
        else:
            tokens = torch.empty(0, dtype=torch.int64, device=self.device)
        host = self.host_tokens[self.turn][:S]
        event = None
        if self.device.type == "cuda":
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(tokens)
        self.turn ^= 1
        return StepHandle(batch, tokens, host, event, graph_size is not None)

    def _quant_plan(self, seqs: list[Sequence], starts: list[int], counts: list[int]):
        """int4's tail-slot plan for this step (None for other formats)."""
        quant, tables = self.cache.quant, self.cache.tables
        if quant is None or quant.fmt != "int4":
            return None
        live = {sid: (tables.seqs[sid].blocks, self.cache.num_tokens(sid)) for sid in tables.seq_ids()}
        return quant.plan([tables.seqs[s.cache_seq].blocks for s in seqs], starts, counts, live, self.device)

    def _upload(self, parts64: list[np.ndarray], parts32: list[np.ndarray]):
        """Pack host arrays into this turn's pinned buffers, one copy each to the device; device views back."""
        out = []
        for parts, host, dev in ((parts64, self.host64[self.turn], self.dev64),
                                 (parts32, self.host32[self.turn], self.dev32)):
            flat, views, at = host.numpy(), [], 0
            for a in parts:
                n = a.size
                flat[at:at + n] = a
                views.append(dev[at:at + n])
                at += n
            dev[:at].copy_(host[:at], non_blocking=True)
            out.append(views)
        return out

    def _graph_size(self, B: int) -> int | None:
        for b in self.graphs:  # ascending
            if b >= B:
                return b
        return None

    # --- CUDA graphs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture_graphs(self, sizes: list[int]) -> None:
        """Record one decode step per batch size over fixed views of the staging buffers (largest first,
        so the smaller graphs reuse its memory pool)."""
        c = self.cache
        self.scratch_seq = c.add_sequence()  # one block that padding rows write into, never read
        self.scratch_block = c.append_slots(self.scratch_seq, 1)[0] // self.block_size
        self.scratch_slot = self.scratch_block * self.block_size
        W = self.width
        for b in sorted(sizes, reverse=True):
            # The layout _upload gives a padded decode batch of b rows: ids, positions, slots | lens, tables.
            ids, pos, slots = self.dev64[:b], self.dev64[b:2 * b], self.dev64[2 * b:3 * b]
            lens, tables = self.dev32[:b], self.dev32[b:b + b * W].view(b, W)
            ids.zero_()
            pos.zero_()
            slots.fill_(self.scratch_slot)
            lens.fill_(1)
            tables.fill_(self.scratch_block)
            fb = ForwardBatch(c)
            fb.set(positions=pos, slot_mapping=slots, num_decode=b, block_tables=tables, context_lens=lens)
            replay, logits = self._record(lambda ids=ids, fb=fb: self.model(ids[None], cache=fb)[0])
            self.graphs[b] = (replay, logits, fb)
        self.graphs = dict(sorted(self.graphs.items()))

    def _record(self, step):
        """(replay, output): `step` recorded as a CUDA graph in the runner's shared memory pool."""
        for _ in range(2):  # warm up: Triton compiles, autotunes and sizes its workspaces outside capture
            step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        self._pool = graph.pool()
        torch.cuda.synchronize()
        return graph.replay, out
