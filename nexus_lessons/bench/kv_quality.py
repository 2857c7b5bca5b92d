"""What each quantized KV format costs in quality on nexus-tiny, teacher-forced on held-out code.

    python -m nexus_lessons.bench kv_quality --out course/results      # ~2-4 min on a laptop CPU

Held-out text: Python that nexus-tiny never saw. It was trained on the standard library's own ``*.py``
files (``nexus_lessons/tiny/corpus.py``); pip's source is not among them, yet every CPython install
carries it, as the wheel that ``ensurepip`` bundles inside the standard library (``ensurepip/_bundled``;
where a distribution strips that, the installed ``pip`` package). A fixed list of pip's own modules is
read (``FILES``); the JSON records the pip version and which files were found.

Teacher-forced *decode*: every window is fed one token at a time through a `PagedKVCache` of each format,
so every prediction reads the context back from the quantized cache, exactly as generation does (one
prefill would let the window's tokens attend to each other in full precision and hide the format).
Reported per format: perplexity and its increase over the full-precision cache ("auto", the same
code path), with the standard error of that increase over the windows; how often the argmax agrees
with the full-precision cache's; and greedy generation from the windows' first tokens: the fraction of
generated tokens equal to the full-precision cache's, and the mean length of the identical prefix.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..generate import generate
from ..kernels import dispatch
from ..kernels.quant_reference import bytes_per_token
from ..loading import load_model
from ..paged import PagedKVCache
from .common import environment, save_json

FILES = (  # pip's own modules, present in pip 20 to 26
    "pip/_internal/req/req_install.py", "pip/_internal/index/package_finder.py", "pip/_internal/cli/base_command.py",
    "pip/_internal/operations/prepare.py", "pip/_internal/resolution/resolvelib/factory.py",
    "pip/_internal/utils/misc.py", "pip/_internal/network/session.py", "pip/_internal/commands/install.py",
    "pip/_internal/req/req_file.py", "pip/_internal/models/link.py", "pip/_internal/vcs/versioncontrol.py",
    "pip/_internal/exceptions.py", "pip/_internal/wheel_builder.py", "pip/_internal/cache.py",
    "pip/_internal/cli/cmdoptions.py", "pip/_internal/operations/install/wheel.py",
)  # fmt: skip
FORMATS = ("auto", "int8", "fp8", "int4")
TARGET_PCT = {"int8": 0.5, "fp8": 1.0, "int4": 5.0}  # allowed perplexity increase over "auto"
BLOCK_SIZE = {"auto": 16, "int8": 16, "fp8": 16, "int4": 64}


def heldout_sources() -> tuple[dict[str, str], dict[str, Any]]:
    """{path: text} of FILES from pip's bundled wheel (or the installed pip), and where they came from."""
    bundled = sorted((Path(sysconfig.get_paths()["stdlib"]) / "ensurepip" / "_bundled").glob("pip-*.whl"))
    texts: dict[str, str] = {}
    if bundled:
        with zipfile.ZipFile(bundled[-1]) as z:
            names = set(z.namelist())
            texts = {f: z.read(f).decode("utf-8") for f in FILES if f in names}
        source = {"source": f"ensurepip wheel {bundled[-1].name}", "pip_version": bundled[-1].name.split("-")[1]}
    else:
        import pip

        root = Path(pip.__file__).parents[1]
        texts = {f: (root / f).read_text("utf-8") for f in FILES if (root / f).exists()}
        source = {"source": f"installed pip at {root}", "pip_version": pip.__version__}
    if not texts:
        raise RuntimeError("none of pip's modules in FILES was found: no held-out text")
    return texts, {**source, "files": sorted(texts), "missing": sorted(set(FILES) - set(texts))}


def windows(tokenizer, texts: dict[str, str], count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens: each file cut into consecutive windows, files in FILES order,
    one window per file per round (so the windows cover as many files as possible)."""
    per_file = [tokenizer.encode(texts[f]) for f in FILES if f in texts]
    chunks = [[ids[i : i + length] for i in range(0, len(ids) - length + 1, length)] for ids in per_file]
    out: list[list[int]] = []
    for r in range(max(len(c) for c in chunks)):
        out += [c[r] for c in chunks if r < len(c)]
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} windows of {length} tokens in the held-out files; asked for {count}")
    return torch.tensor(out[:count])


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window summed NLL [W] and the argmax at every position [W, L-1], one token per step."""
    W, L = ids.shape
    bs = BLOCK_SIZE[fmt]
    cache = PagedKVCache.for_model(model, W * math.ceil(L / bs), bs, kv_cache_dtype=fmt)
    cache.validate_kernel_args = False  # the cache builds its own metadata
    nll = torch.zeros(W, dtype=torch.float64)
    argmax = torch.empty(W, L - 1, dtype=torch.long)
    ids = ids.to(model.device)
    for t in range(L - 1):
        logits = model(ids[:, t : t + 1], cache=cache)[:, -1].float()
        nll += F.cross_entropy(logits, ids[:, t + 1], reduction="none").double().cpu()
        argmax[:, t] = logits.argmax(-1).cpu()
    return nll, argmax


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, fmt: str) -> torch.Tensor:
    bs = BLOCK_SIZE[fmt]
    W, P = prompts.shape
    cache = PagedKVCache.for_model(model, W * math.ceil((P + new_tokens) / bs), bs, kv_cache_dtype=fmt)
    cache.validate_kernel_args = False
    return generate(model, prompts.to(model.device), new_tokens, cache=cache)[:, P:].cpu()


def run(num_windows: int, window: int, prompt_len: int, new_tokens: int, device: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tokenizer = load_model("nexus-tiny", device=device)
    c = model.config
    texts, provenance = heldout_sources()
    ids = windows(tokenizer, texts, num_windows, window)
    results: dict[str, Any] = {
        "benchmark": "kv_quality",
        "environment": environment(),
        "model": "nexus-tiny",
        "dtype": str(model.dtype),
        "heldout": {**provenance, "windows": num_windows, "window_tokens": window, "scored_tokens": num_windows * (window - 1)},
        "method": "teacher-forced decode, one token per step through PagedKVCache(kv_cache_dtype=...); greedy: "
        f"{new_tokens} tokens from each window's first {prompt_len}",
        "block_size": BLOCK_SIZE,
        "targets_pct": TARGET_PCT,
        "formats": {},
    }  # fmt: skip
    base_nll = base_argmax = base_greedy = None
    for fmt in FORMATS:
        t = time.perf_counter()
        nll, argmax = teacher_forced(model, ids, fmt)
        gen = greedy(model, ids[:, :prompt_len], new_tokens, fmt)
        if fmt == "auto":
            base_nll, base_argmax, base_greedy = nll, argmax, gen
        n = num_windows * (window - 1)
        ppl = math.exp(float(nll.sum()) / n)
        base_ppl = math.exp(float(base_nll.sum()) / n)
        # per-window increase of the mean NLL; its spread over the windows gives the error bar
        d = (nll - base_nll) / (window - 1)
        same = gen == base_greedy
        prefix = same.int().cumprod(1).sum(1).double()
        row = {
            "perplexity": round(ppl, 4),
            "increase_pct": round(100 * (ppl / base_ppl - 1), 3),
            "increase_pct_stderr": round(100 * float(d.std() / math.sqrt(num_windows)), 3) if num_windows > 1 else None,
            "argmax_agreement": round(float((argmax == base_argmax).double().mean()), 4),
            "greedy_identical_tokens": round(float(same.double().mean()), 4),
            "greedy_mean_identical_prefix": round(float(prefix.mean()), 2),
            "bytes_per_token_per_layer": bytes_per_token(fmt, c.num_key_value_heads, c.head_dim, BLOCK_SIZE[fmt]),
            "seconds": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        if fmt != "auto":
            row["target_pct"] = TARGET_PCT[fmt]
            row["meets_target"] = row["increase_pct"] <= TARGET_PCT[fmt]
        results["formats"][fmt] = row
        print(f"{fmt:5s} ppl {ppl:8.4f}  +{row['increase_pct']:6.3f}%  argmax agree {row['argmax_agreement']:.4f}  "
              f"greedy identical {row['greedy_identical_tokens']:.3f}  ({row['seconds']} s)", flush=True)  # fmt: skip
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nexus_lessons.bench kv_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="course/results", help="folder for kv_quality.json")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny run that checks the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.windows, args.window, args.prompt_len, args.new_tokens = 2, 20, 6, 4
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = dispatch.get_default_impl()
    if device.type != "cuda":  # the interpreter would take hours; the kernels equal these references (tests)
        dispatch.set_default_impl("reference")
        torch.set_num_threads(1)  # an 8M model: threads cost more than they give
    try:
        results = run(args.windows, args.window, args.prompt_len, args.new_tokens, str(device))
    finally:
        dispatch.set_default_impl(saved)
    path = save_json(results, Path(args.out) / "kv_quality.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
