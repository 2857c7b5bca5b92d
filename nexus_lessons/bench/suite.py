"""`InferenceBenchmark`: generation speed of each technique side by side, on the same model and prompts.

Every technique must produce exactly the baseline's greedy tokens (the exactness invariant) before
its time counts. Lessons register their techniques in `TECHNIQUES`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..generate import generate
from ..loading import load_model
from .common import environment, save_json

# name -> fn(model, input_ids, max_new_tokens) -> tokens [B, T + n]
TECHNIQUES: dict[str, Callable[..., torch.Tensor]] = {
    "baseline": lambda model, ids, n: generate(model, ids, n, cache=None),
    "kv_cache": lambda model, ids, n: generate(model, ids, n, cache="static"),
    "kv_cache_dynamic": lambda model, ids, n: generate(model, ids, n, cache="dynamic"),
    "paged_kv_cache": lambda model, ids, n: generate(model, ids, n, cache="paged"),
}


class InferenceBenchmark:
    """Time `techniques` for every batch size and number of new tokens; `run()` then `plot_comparison()`.

    `sequence_lengths` are the numbers of new tokens generated after a `prompt_len`-token prompt of
    random ids. Times are wall-clock medians of `repeats` runs after one warm-up (CUDA synchronised).
    """

    def __init__(self, model_name: str = "nexus-tiny", techniques: list[str] | str = ("baseline", "kv_cache"),
                 batch_sizes: list[int] = (1,), sequence_lengths: list[int] = (128,), *, prompt_len: int = 32,
                 repeats: int = 3, device: str | None = None, dtype: torch.dtype | None = None,
                 seed: int = 0, progress: bool = True) -> None:
        if techniques == "all":
            techniques = list(TECHNIQUES)
        unknown = [t for t in techniques if t not in TECHNIQUES]
        if unknown:
            raise ValueError(f"unknown techniques {unknown}; known: {sorted(TECHNIQUES)}")
        if not techniques or not batch_sizes or not sequence_lengths:
            raise ValueError("give at least one technique, batch size and sequence length")
        if any(b < 1 for b in batch_sizes) or any(n < 1 for n in sequence_lengths) or prompt_len < 1:
            raise ValueError("batch sizes, sequence lengths and prompt_len must be >= 1")
        self.model_name, self.techniques = model_name, list(techniques)
        self.batch_sizes, self.sequence_lengths = list(batch_sizes), list(sequence_lengths)
        self.prompt_len, self.repeats, self.seed, self.progress = prompt_len, repeats, seed, progress
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.results: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}

    def _time(self, fn, model, ids, n) -> tuple[float, torch.Tensor]:
        sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
        fn(model, ids, min(n, 4))  # warm-up
        times, out = [], None
        for _ in range(self.repeats):
            sync()
            t0 = time.perf_counter()
            out = fn(model, ids, n)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def run(self) -> list[dict[str, Any]]:
        model, _ = load_model(self.model_name, device=self.device, dtype=self.dtype, tokenizer=False)
        self.meta = {**environment(), "model": self.model_name, "parameters": sum(p.numel() for p in model.parameters()),
                     "dtype": str(model.dtype), "prompt_len": self.prompt_len, "repeats": self.repeats}
        g = torch.Generator().manual_seed(self.seed)
        jobs = [(b, n) for b in self.batch_sizes for n in self.sequence_lengths]
        bar = tqdm(total=len(jobs) * len(self.techniques), disable=not self.progress, desc="benchmark")
        self.results = []
        for b, n in jobs:
            ids = torch.randint(0, model.config.vocab_size, (b, self.prompt_len), generator=g).to(self.device)
            reference = generate(model, ids, n, cache="static")  # what every technique must reproduce
            base_time = None
            for name in self.techniques:
                bar.set_postfix_str(f"{name} b={b} n={n}")
                seconds, out = self._time(TECHNIQUES[name], model, ids, n)
                if not torch.equal(out, reference):
                    raise AssertionError(f"{name} changed the greedy tokens (batch {b}, {n} new tokens)")
                if name == "baseline":
                    base_time = seconds
                self.results.append({"technique": name, "batch_size": b, "new_tokens": n, "seconds": seconds,
                                     "tokens_per_s": b * n / seconds})
                bar.update()
            for row in self.results[-len(self.techniques):]:
                if base_time is not None:
                    row["speedup"] = base_time / row["seconds"]
        bar.close()
        return self.results

    def save(self, path: str | Path) -> Path:
        return save_json({**self.meta, "results": self.results}, path)

    def plot_comparison(self, save_path: str | Path | None = None):
        """Tokens/s against new tokens, one line per technique and batch size (and speed-up if a baseline ran)."""
        import matplotlib.pyplot as plt

        if not self.results:
            raise RuntimeError("call run() before plot_comparison()")
        has_speedup = any("speedup" in r for r in self.results)
        fig, axes = plt.subplots(1, 2 if has_speedup else 1, figsize=(11 if has_speedup else 6, 4), squeeze=False)
        for name in self.techniques:
            for b in self.batch_sizes:
                rows = [r for r in self.results if r["technique"] == name and r["batch_size"] == b]
                xs = [r["new_tokens"] for r in rows]
                label = name if len(self.batch_sizes) == 1 else f"{name}, batch {b}"
                axes[0][0].plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=label)
                if has_speedup:
                    axes[0][1].plot(xs, [r["speedup"] for r in rows], marker="o", label=label)
        axes[0][0].set(xlabel="new tokens", ylabel="tokens / s", yscale="log",
                       title=f"{self.model_name} on {self.meta.get('device', self.device)}")
        if has_speedup:
            axes[0][1].set(xlabel="new tokens", ylabel="speed-up over baseline (x)", title="speed-up")
        for ax in axes[0]:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        if save_path is not None:
            Path(save_path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(save_path, dpi=100)
        return fig
