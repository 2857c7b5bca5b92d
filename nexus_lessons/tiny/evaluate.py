"""Measure the shipped pair: held-out loss, how often the draft guesses the target, sample completions.

    python -m nexus_lessons.tiny.evaluate                      # shipped models -> course/results/tiny_models.json
    python -m nexus_lessons.tiny.evaluate --target DIR --draft DIR --tokens-file .carry/tiny_data --out FILE

Everything runs in float32 on the weights as saved (what the lessons load). Over the held-out files
(non-overlapping windows of `context` tokens):
- loss and perplexity of each model, and its top-1 accuracy on the real next token;
- `greedy_agreement`: the fraction of positions where argmax(draft) == argmax(target): the chance a
  greedy speculative step accepts one drafted token (lesson 05);
- `expected_acceptance_t1`: the mean of sum_v min(p_target, p_draft), the acceptance probability of
  speculative *sampling* at temperature 1;
plus greedy completions of three prompts from both models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..generate import generate
from ..loading import load_model, resolve_model_path
from .recipe import flops_per_token, non_embedding_params

PROMPTS = ("def fibonacci(n):", "class Stack:", "import os\n")
MIN_GREEDY_AGREEMENT = 0.6
DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "course" / "results" / "tiny_models.json"


def windows(tokens: np.ndarray, context: int) -> list[torch.Tensor]:
    """Non-overlapping windows of context + 1 tokens (the last one shorter), covering the whole stream."""
    t = torch.from_numpy(tokens.astype(np.int64))
    out = [t[i:i + context + 1] for i in range(0, t.numel() - 1, context)]
    return [w for w in out if w.numel() >= 2]


@torch.no_grad()
def heldout_metrics(target: torch.nn.Module, draft: torch.nn.Module, tokens: np.ndarray, context: int,
                    batch_size: int = 8) -> dict[str, Any]:
    device = target.device
    sums = {"t_nll": 0.0, "d_nll": 0.0, "t_acc": 0.0, "d_acc": 0.0, "agree": 0.0, "min_pq": 0.0}
    n = 0
    ws = windows(tokens, context)
    full = [w for w in ws if w.numel() == context + 1]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in ws if w.numel() < context + 1]
    for group in groups:
        w = torch.stack(group).to(device)
        x, y = w[:, :-1], w[:, 1:].flatten()
        lt = target(x).float().flatten(0, 1)
        ld = draft(x).float().flatten(0, 1)
        sums["t_nll"] += F.cross_entropy(lt, y, reduction="sum").item()
        sums["d_nll"] += F.cross_entropy(ld, y, reduction="sum").item()
        at, ad = lt.argmax(-1), ld.argmax(-1)
        sums["t_acc"] += (at == y).sum().item()
        sums["d_acc"] += (ad == y).sum().item()
        sums["agree"] += (at == ad).sum().item()
        sums["min_pq"] += torch.minimum(lt.softmax(-1), ld.softmax(-1)).sum().item()
        n += y.numel()
    if n == 0:
        raise ValueError("the held-out stream has fewer than 2 tokens")
    m = {k: v / n for k, v in sums.items()}
    return {
        "tokens": n, "context": context,
        "target": {"loss": round(m["t_nll"], 4), "perplexity": round(math.exp(m["t_nll"]), 3),
                   "top1_accuracy": round(m["t_acc"], 4)},
        "draft": {"loss": round(m["d_nll"], 4), "perplexity": round(math.exp(m["d_nll"]), 3),
                  "top1_accuracy": round(m["d_acc"], 4)},
        "greedy_agreement": round(m["agree"], 4),
        "expected_acceptance_t1": round(m["min_pq"], 4),
    }


def completions(target: torch.nn.Module, draft: torch.nn.Module, tok: Any, prompts: tuple[str, ...],
                max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy completions (static KV cache, stop at eos) from both models for each prompt."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=target.device)
        row: dict[str, Any] = {"prompt": prompt}
        gen = {}
        for name, model in (("target", target), ("draft", draft)):
            toks = generate(model, ids, max_new_tokens, cache="static", eos_token_id=tok.eos_token_id)
            gen[name] = toks[0, ids.shape[1]:].tolist()
            row[name] = tok.decode(gen[name], skip_special_tokens=True)
        same = 0
        while same < min(len(gen["target"]), len(gen["draft"])) and gen["target"][same] == gen["draft"][same]:
            same += 1
        row["draft_matches_target_for_tokens"] = same
        out.append(row)
    return out


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    c = model.config
    return {"params": c.num_parameters, "non_embedding_params": non_embedding_params(c),
            "flops_per_token": flops_per_token(c), "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size}


def evaluate(target_path: str | Path, draft_path: str | Path, heldout: np.ndarray, *,
             device: torch.device | str | None = None, context: int = 1024, max_tokens: int | None = None,
             max_new_tokens: int = 64, prompts: tuple[str, ...] = PROMPTS) -> dict[str, Any]:
    """All the numbers for tiny_models.json (the caller adds `command`)."""
    from .train import device_name, versions

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    target, tok = load_model(target_path, device=device, dtype=torch.float32)
    draft, _ = load_model(draft_path, device=device, dtype=torch.float32, tokenizer=False)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("draft and target have different vocabularies; they must share the tokenizer")
    if max_tokens is not None:
        heldout = heldout[:max_tokens]
    metrics = heldout_metrics(target, draft, heldout, context)
    ts, ds = model_summary(target), model_summary(draft)
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_name(device), "versions": versions(), "dtype": "float32",
        "target_path": str(target_path), "draft_path": str(draft_path),
        "models": {"nexus-tiny": {**ts, **metrics.pop("target")}, "nexus-tiny-draft": {**ds, **metrics.pop("draft")}},
        "heldout": {"tokens": metrics.pop("tokens"), "context": metrics.pop("context")},
        "draft_vs_target": {**metrics, "cost_ratio_target_over_draft": round(ts["flops_per_token"] / ds["flops_per_token"], 3),
                            "meets_min_greedy_agreement": metrics["greedy_agreement"] >= MIN_GREEDY_AGREEMENT,
                            "min_greedy_agreement": MIN_GREEDY_AGREEMENT},
        "samples": completions(target, draft, tok, prompts, max_new_tokens),
    }
    results["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    a = results["draft_vs_target"]
    print(f"[tiny] eval: target loss {results['models']['nexus-tiny']['loss']}, draft loss "
          f"{results['models']['nexus-tiny-draft']['loss']}, greedy agreement {a['greedy_agreement']}, "
          f"expected acceptance (T=1) {a['expected_acceptance_t1']}", flush=True)
    if not a["meets_min_greedy_agreement"]:
        print(f"[tiny] WARNING: greedy agreement {a['greedy_agreement']} is below {MIN_GREEDY_AGREEMENT}", flush=True)
    return results


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"[tiny] wrote {path}", flush=True)
    return path


def heldout_tokens(tokens_file: Path | None, target_folder: Path) -> np.ndarray:
    """The held-out stream: from the prepared corpus if there is one, else tokenized here from the stdlib."""
    from .corpus import build_splits, load_tokens, tokenize_documents
    from .tokenizer import eos_id, load_tokenizer

    if tokens_file is not None and (tokens_file / "heldout.npy").exists():
        return load_tokens(tokens_file)[1]
    tok = load_tokenizer(target_folder)
    return tokenize_documents(tok, build_splits().heldout, eos_id(tok))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .prepare import DEFAULT_TOKENS_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="nexus-tiny", help="shipped name or HF folder")
    p.add_argument("--draft", default="nexus-tiny-draft", help="shipped name or HF folder")
    p.add_argument("--tokens-file", type=Path, default=DEFAULT_TOKENS_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--device", default=None)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=None, help="cap the held-out tokens (quick CPU runs)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    heldout = heldout_tokens(a.tokens_file, resolve_model_path(a.target))
    results = evaluate(a.target, a.draft, heldout, device=a.device, context=a.context, max_tokens=a.max_tokens,
                       max_new_tokens=a.max_new_tokens)
    results["command"] = " ".join(["python", "-m", "nexus_lessons.tiny.evaluate", *(sys.argv[1:] if argv is None else argv)])
    write_results(results, a.out)
    return results


if __name__ == "__main__":
    main()
