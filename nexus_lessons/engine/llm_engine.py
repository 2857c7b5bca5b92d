"""The engine: requests in, tokens out, one scheduled forward per `step()` (nano-vllm's LLMEngine).

    engine = LLMEngine("nexus-tiny", max_num_seqs=64)
    rid = engine.add_request("def fib(n):", SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():              # each request's new tokens: streaming
            print(out.request_id, out.new_token_ids, out.finished)

A step schedules (scheduler.py), launches the forward and the sampling without waiting (model_runner.py),
then reads back the tokens of the step launched before, checks stop conditions and frees the blocks of
finished requests. Reading one step late lets the host prepare step t+1 while the device runs step t;
the only cost is that a request stopped by a stop token has one more token computed and thrown away.

The options of lessons 03-05 plug in here:
* `enable_prefix_caching=True | "hash" | "radix"`: the pool gets a prefix cache (lesson 04); the scheduler
  admits a request after its longest cached prefix, and every finished or preempted sequence leaves its
  K/V cached. Running sequences cache their full blocks after each prefill chunk, so requests that arrive
  while they run share them too.
* `kv_cache_dtype="int8" | "fp8" | "int4"`: the pool stores quantized blocks (lesson 03) and every step
  writes and reads them through the dequantizing kernels (forward_batch.py). int8 and fp8 decode steps
  replay CUDA graphs like plain ones; int4 runs eagerly (its per-step plan of tail slots is built on the
  host and its tail pool grows on demand, so the tensors a graph would read move).
* `speculative={"method": "ngram" | "draft", "num_speculative_tokens": k, "model": ...}` (lesson 05): a
  step is then either prefill chunks (the scheduler with decodes left out) or one speculative step over
  the running sequences (speculative.batched.BatchedSpeculator: each row accepts its own number of
  tokens, 1 to k + 1). Both run synchronously, without the overlap above; sampled requests then draw from
  one engine generator (the distribution is the target's; a request's `seed` no longer fixes its draws).
  The context keeps k positions of headroom for the drafts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from numbers import Integral
from pathlib import Path

import torch

from ..model import Transformer
from ..paged import PagedKVCache
from .model_runner import ModelRunner, StepHandle
from .sampling_params import SamplingParams
from .scheduler import POLICIES, ScheduledBatch, Scheduler
from .sequence import Sequence
from .speculate import Speculation

KV_CACHE_DTYPES = ("auto", "int8", "fp8", "int4")
SPECULATIVE_METHODS = ("ngram", "draft")
CPU_KV_BYTES = 256 << 20  # default pool on a CPU: at most this much K/V


@dataclass
class EngineConfig:
    """Engine options (`LLM(model, **options)`); every other keyword is an error."""

    max_num_seqs: int = 256  # most sequences in one step
    max_num_batched_tokens: int = 8192  # most tokens in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: sized from free GPU memory; on a CPU, <= 256 MiB
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # no CUDA graphs
    scheduling_policy: str = "fcfs"  # or "priority"
    enable_prefix_caching: bool | str = False  # lesson 04: True (= "hash") | "hash" | "radix"
    kv_cache_dtype: str = "auto"  # lesson 03: "int8" | "fp8" | "int4"
    speculative: dict | None = None  # lesson 05: {"method": "ngram" | "draft", "num_speculative_tokens": k, "model": ...}
    device: str | torch.device | None = None  # for a model loaded by name
    dtype: torch.dtype | None = None  # for a model loaded by name (default bf16 on a GPU, float32 on a CPU)

    @classmethod
    def from_options(cls, options: dict) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; the options are {sorted(known)}")
        config = cls(**options)
        config.check()
        return config

    def check(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _check_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {self.scheduling_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.enable_prefix_caching not in (False, True, "hash", "radix"):
            raise ValueError(f"enable_prefix_caching must be a bool, 'hash' or 'radix', got {self.enable_prefix_caching!r}")
        if self.kv_cache_dtype == "int4" and self.enable_prefix_caching == "radix":
            raise ValueError("kv_cache_dtype='int4' keeps a block's unfilled tail outside the block, and the radix "
                             "prefix cache shares partly filled blocks: use enable_prefix_caching='hash' with int4")
        if self.speculative is not None:
            spec = self.speculative
            if not isinstance(spec, dict) or spec.get("method") not in SPECULATIVE_METHODS:
                raise ValueError(f"speculative must be a dict with 'method' in {SPECULATIVE_METHODS}, got {spec!r}")
            unknown = sorted(set(spec) - {"method", "num_speculative_tokens", "model"})
            if unknown:
                raise ValueError(f"unknown speculative option(s) {unknown}")
            _check_int("num_speculative_tokens", spec.get("num_speculative_tokens", 5))
            if spec["method"] == "draft" and spec.get("model") is None:
                raise ValueError("speculative method 'draft' needs a 'model' (a name, a folder or a Transformer)")


def _check_int(name: str, value) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class StepOutput:
    """What one request got in one step: its new tokens, and whether it finished (and why)."""

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    sequence: Sequence  # the whole state: every token, timings


class LLMEngine:
    def __init__(self, model: str | Path | Transformer = "nexus-tiny", tokenizer=None, **options) -> None:
        self.config = config = EngineConfig.from_options(options)
        self.model, self.tokenizer = _load(model, tokenizer, config)
        mc = self.model.config
        limit = mc.max_position_embeddings if mc.sliding_window is None else min(mc.max_position_embeddings, mc.sliding_window)
        self.spec = None if config.speculative is None else Speculation(self.model, config.speculative)
        self.lookahead = 0 if self.spec is None else self.spec.k  # slots a speculative step reserves beyond a token
        limit -= self.lookahead
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context of {limit} tokens")
        eos = mc.eos_token_id if getattr(self.tokenizer, "eos_token_id", None) is None else self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        if self.model.device.type == "cuda":
            # One matmul for q/k/v and one for gate/up; at <= 4 rows one GEMV kernel per projection with the
            # norm, activation and residual folded in (kernels.gemv). Off the GPU the plain layers run.
            self.model.fuse_projections(fused_gemv=True)
        num_blocks = config.num_kv_blocks or self._default_num_blocks()
        prefix = {True: "hash", False: None}.get(config.enable_prefix_caching, config.enable_prefix_caching)
        self.cache = PagedKVCache.for_model(self.model, num_blocks, config.block_size,
                                            kv_cache_dtype=config.kv_cache_dtype, prefix_cache=prefix)
        eager = config.enforce_eager or config.kv_cache_dtype == "int4" or self.spec is not None  # see the docstring
        self.runner = ModelRunner(self.model, self.cache, max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, enforce_eager=eager)
        # What the pool holds for requests (the runner may keep one scratch block for CUDA-graph padding).
        self.capacity = self.cache.num_free_blocks * config.block_size
        self.scheduler = Scheduler(self.cache, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len, policy=config.scheduling_policy)
        self.scheduler.on_release = self._on_release
        self.scheduler.defer_admission = bool(self.runner.graphs)  # eager prefill steps cost many replays
        self.requests: dict[int, Sequence] = {}  # unfinished requests by id
        self._next_id = 0
        self._inflight: StepHandle | None = None
        self.last_batch: ScheduledBatch | None = None  # what the last step launched (the lesson's timeline)
        # Counters since construction; host_s is time step() works on the host, wait_s time it blocks on the
        # device's tokens (an engine that never waits is host-bound: the GPU idles between steps).
        self.stats = {"steps": 0, "graph_steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "spec_steps": 0, "spec_proposed": 0, "spec_accepted": 0, "host_s": 0.0, "wait_s": 0.0}

    def _default_num_blocks(self) -> int:
        c, bs = self.model.config, self.config.block_size
        pools = [PagedKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, bs, n, dtype=self.model.dtype,
                              device="meta", kv_cache_dtype=self.config.kv_cache_dtype) for n in (1, 2)]
        block_bytes = pools[1].nbytes - pools[0].nbytes  # one block, scales included (not int4's tail slots)
        wanted = self.config.max_num_seqs * -(-self.max_model_len // bs)
        if self.model.device.type != "cuda":
            return max(1, min(wanted, CPU_KV_BYTES // block_bytes))
        return max(1, kv_blocks_from_free_memory(self.model, block_bytes, self.config.max_num_batched_tokens,
                                                 self.config.max_num_seqs, self.config.gpu_memory_utilization))

    # --- requests -------------------------------------------------------------------------------------
    def validate(self, prompt, params: SamplingParams | None = None, priority: int = 0) -> tuple[list[int], SamplingParams]:
        """(prompt token ids, params) or ValueError naming what is wrong, before anything is queued."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, Integral) or isinstance(priority, bool):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass token ids, or a tokenizer to the engine")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise ValueError(f"a tensor prompt must be 1-D token ids, got {prompt.dtype} {tuple(prompt.shape)}")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V}), got min {min(ids)}, max {max(ids)}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the model's context of "
                             f"{self.max_model_len} tokens (max_model_len)")
        need = min(len(ids) + params.max_tokens, self.max_model_len) - 1 + self.lookahead  # K/V slots it can hold
        if need > self.capacity:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV slots "
                             f"but the whole pool holds {self.capacity}: raise num_kv_blocks or lower max_tokens")
        return ids, params

    def add_request(self, prompt, params: SamplingParams | None = None, *, priority: int = 0) -> int:
        """Queue a request (text or token ids); returns its id. A bad request raises and changes nothing."""
        ids, params = self.validate(prompt, params, priority)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(rid, ids, params, seed, priority=int(priority))
        seq.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self.requests[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: int) -> bool:
        """Stop a request now and give its blocks back; False if it is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        wait0 = self.stats["wait_s"]
        if self.spec is not None:
            outputs = self._speculative_step()
        else:
            batch = self.scheduler.schedule()
            handle = None
            if len(batch):
                handle = self._launch(batch)
            elif self._inflight is None and self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler found nothing to run with nothing in flight")  # a bug, not bad input
            outputs = self._collect(self._inflight) if self._inflight is not None else []
            self._inflight, self.last_batch = handle, batch
        # Host time vs time blocked on the device: a host-bound engine waits for nothing.
        self.stats["host_s"] += time.perf_counter() - t0 - (self.stats["wait_s"] - wait0)
        return outputs

    def _launch(self, batch: ScheduledBatch) -> StepHandle:
        handle = self.runner.launch(batch, self._inflight)
        if self.cache.prefix_cache is not None:  # prefill chunks: their full blocks can serve other requests now
            for seq in batch.seqs[batch.num_decode:]:
                self.cache.cache_tokens(seq.cache_seq)
        j = 0
        for seq, sampled in zip(batch.seqs, batch.samples):
            if sampled:
                seq.num_pending += 1
                seq.pending_index = j
                j += 1
        self.stats["steps"] += 1
        self.stats["graph_steps"] += handle.graph
        self.stats["decode_tokens"] += batch.num_decode
        self.stats["prefill_tokens"] += batch.num_tokens - batch.num_decode
        return handle

    def _speculative_step(self) -> list[StepOutput]:
        """Prefill chunks if any sequence needs one, else one speculative decode step over the running ones."""
        batch = self.scheduler.schedule(decode=False)
        self.last_batch = batch
        if len(batch):
            return self._collect(self._launch(batch))
        rows = self.spec.reserve(self.scheduler, self.config.max_num_batched_tokens)
        if not rows:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler found nothing to run")  # a bug, not bad input
            return []
        new = self.spec.step(self.cache, rows)
        self.stats["spec_steps"] += 1
        self.stats["spec_proposed"] += sum(self.spec.speculator.last_proposed)
        self.stats["spec_accepted"] += sum(self.spec.speculator.last_accepted)
        outputs = []
        for seq, tokens in zip(rows, new):
            seq.num_computed = self.cache.num_tokens(seq.cache_seq)  # its tokens + the drafts it kept
            out = self._append(seq, tokens, time.perf_counter())
            if out is not None:
                outputs.append(out)
        return outputs

    def _collect(self, handle: StepHandle) -> list[StepOutput]:
        t0 = time.perf_counter()
        tokens = handle.token_ids()
        now = time.perf_counter()
        self.stats["wait_s"] += now - t0
        outputs = []
        it = iter(tokens)
        for seq, sampled in zip(handle.batch.seqs, handle.batch.samples):
            if not sampled:
                continue
            tok = next(it)
            if seq.is_finished:  # aborted, or stopped while this step was in flight: the token is dropped
                continue
            seq.num_pending -= 1
            outputs.append(self._append(seq, [tok], now))
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], now: float) -> StepOutput:
        """Add a request's new tokens up to the first stop token or its length; finish it there."""
        reason, kept = None, []
        for tok in tokens:
            seq.token_ids.append(tok)
            kept.append(tok)
            if tok in seq.stop_ids:
                reason = "stop"
            elif len(seq.token_ids) >= seq.max_num_tokens:  # max_tokens, or the model's context
                reason = "length"
            if reason is not None:
                break
        if seq.first_token_time is None:
            seq.first_token_time = now
        if reason is not None:
            del self.requests[seq.request_id]
            seq.finish_time = now
            self._finish(seq, reason)
        return StepOutput(seq.request_id, kept, reason is not None, reason, seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)  # calls _on_release if it holds blocks

    def _on_release(self, seq: Sequence) -> None:
        """The scheduler is about to free a sequence's blocks (finished, aborted or preempted)."""
        self.runner.release(seq)
        if self.spec is not None:
            self.spec.free(seq.cache_seq)

    def check_consistent(self) -> None:
        """Assert the pool's invariants and that the blocks held are exactly the running sequences' (tests)."""
        self.cache.check_consistent()
        held = {s.cache_seq for s in self.scheduler.running}
        if None in held or any(s.cache_seq is not None for s in self.scheduler.waiting):
            raise AssertionError("a running sequence without blocks, or a waiting one with blocks")
        expected = held | ({self.runner.scratch_seq} if self.runner.scratch_seq is not None else set())
        if set(self.cache.sequences) != expected:
            raise AssertionError(f"cache sequences {sorted(self.cache.sequences)} != held {sorted(expected)}")
        for s in self.scheduler.running:
            if not self.cache.tables.num_tokens(s.cache_seq) == self.cache.num_tokens(s.cache_seq) == s.num_computed:
                raise AssertionError(f"request {s.request_id}: {s.num_computed} computed, "
                                     f"{self.cache.tables.num_tokens(s.cache_seq)} slots reserved")


def _load(model, tokenizer, config: EngineConfig):
    if isinstance(model, Transformer):
        if config.device is not None or config.dtype is not None:
            raise ValueError("device and dtype are for a model loaded by name; move the Transformer yourself")
        return model.eval(), tokenizer
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a shipped name, a local HF folder or a Transformer, got {type(model).__name__}")
    from ..loading import load_model

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = config.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded, tok = load_model(model, device=device, dtype=dtype, tokenizer=tokenizer is None)
    return loaded, tokenizer if tokenizer is not None else tok


@torch.no_grad()
def kv_blocks_from_free_memory(model, block_bytes: int, max_tokens: int, max_seqs: int, utilization: float) -> int:
    """How many KV blocks fit in the GPU memory left after the weights and the largest step's activations.

    The activations are measured: one forward of `max_tokens` tokens without a cache (its attention needs
    no more than the engine's) at its peak, plus the sampler's float32 logits for `max_seqs` rows.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model.hidden_states(torch.zeros(1, max_tokens, dtype=torch.long, device=model.device))
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - base + 4 * 4 * max_seqs * model.config.vocab_size
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = free - (1 - utilization) * total - activations
    return math.floor(budget / block_bytes)
