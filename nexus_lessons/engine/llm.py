"""`LLM(model, **options).generate(prompts, sampling_params)`: the offline front door (vLLM's `LLM`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral

from tqdm.auto import tqdm

from .llm_engine import LLMEngine
from .metrics import summarize
from .sampling_params import SamplingParams
from .sequence import Sequence


@dataclass
class RequestOutput:
    """One prompt's result: the generated token ids (prompt excluded) and their text."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    ttft_s: float | None  # time to first token
    tpot_s: float | None  # time per output token after the first


class LLM:
    """A model and an engine; `generate` runs a list of prompts to completion, continuously batched.

    `model` is "nexus-tiny", a local Hugging Face folder, or a `Transformer` (with `tokenizer=` for text);
    the options are `EngineConfig`'s (max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks,
    enforce_eager, scheduling_policy, enable_prefix_caching, kv_cache_dtype, speculative, ...). After a run,
    `last_metrics` holds its throughput, TTFT / TPOT percentiles and prefix-cache hit rate.
    """

    def __init__(self, model="nexus-tiny", tokenizer=None, **options) -> None:
        self.engine = LLMEngine(model, tokenizer, **options)
        self.last_metrics: dict | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 priorities: list[int] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One output per prompt, in prompt order. Every prompt is checked before any runs."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], Integral)):
            prompts = [prompts]  # one prompt: a string or a list of token ids
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        priorities = [0] * len(prompts) if priorities is None else list(priorities)
        if len(params) != len(prompts) or len(priorities) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params and {len(priorities)} priorities")
        engine = self.engine
        checked = [engine.validate(p, sp, pr) for p, sp, pr in zip(prompts, params, priorities)]
        start = time.perf_counter()
        ids = [engine.add_request(p, sp, priority=pr) for (p, sp), pr in zip(checked, priorities)]
        done: dict[int, Sequence] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.sequence
                        bar.update(1)
        seqs = [done[i] for i in ids]
        self.last_metrics = summarize(seqs, time.perf_counter() - start)
        return [self._output(s) for s in seqs]

    def _output(self, seq: Sequence) -> RequestOutput:
        tok = self.engine.tokenizer
        text = None if tok is None else tok.decode(seq.output_token_ids, skip_special_tokens=True)
        return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids, text,
                             seq.finish_reason, seq.ttft, seq.tpot)
