"""What a run measured: throughput, and time to first token / per output token as percentiles."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .sequence import Sequence

PERCENTILES = (50, 90, 99)


def percentiles(values: Iterable[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return {f"p{p}": (float(np.percentile(v, p)) if v.size else None) for p in PERCENTILES} | {
        "mean": float(v.mean()) if v.size else None}


def summarize(seqs: list[Sequence], wall_s: float) -> dict:
    """Per-run figures from finished sequences and the run's wall time (seconds)."""
    out_tokens = sum(len(s.output_token_ids) for s in seqs)
    prompt_tokens = sum(s.num_prompt_tokens for s in seqs)
    return {
        "requests": len(seqs),
        "prompt_tokens": prompt_tokens,
        "prefix_hit_rate": sum(s.num_cached_tokens for s in seqs) / prompt_tokens if prompt_tokens else 0.0,
        "output_tokens": out_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "ttft_s": percentiles(s.ttft for s in seqs),
        "tpot_s": percentiles(s.tpot for s in seqs),
        "preemptions": sum(s.num_preemptions for s in seqs),
    }
