"""Distil `nexus-tiny-draft` from the shipped `nexus-tiny`: one layer, as wide as the target.

    python -m nexus_lessons.tiny.distill --out DIR              # GPU: about 5 minutes, data prep included
    python -m nexus_lessons.tiny.distill --out DIR --smoke      # CPU: a few steps, to know the pipeline runs
    python -m nexus_lessons.tiny.distill --install DIR          # put DIR's draft and JSON into the repository
    python -m nexus_lessons.tiny.distill --out DIR --device cpu --init-from nexus-tiny-draft --minutes 65 \
        --batch-size 8 --context 512 --lr 3e-4 --generated-rounds 4 --generated-rows 64   # CPU: refine a draft

The last form keeps an existing draft's shape and distils it further: an hour of CPU is far too little
to teach one layer started from the target what the shipped two-layer draft already knows, but enough
to move that draft towards the target's distributions. `distill.json` records which recipe ran.

Why this shape. A speculative step costs k draft forwards plus one target forward, and at these sizes a
forward costs about its number of layers (kernel launches and per-layer work, not FLOPs: a 256-wide
layer is no slower than a 128-wide one). So the draft gets a single layer, but the target's full width:
then it can start as the target itself, cut down to its embedding, its first layer and its final norm,
and learn from the target's distributions (KL(target || draft) over the whole vocabulary at every
position, never the corpus' next tokens: the draft's job is to guess the target, mistakes included).

What it learns on. Speculative decoding asks the draft to continue the *target's* text, which drifts
from the corpus (a small model's greedy output loops and repeats itself). So a third of the training
stream is the target's own continuations of corpus windows, half greedy and half sampled at
temperature 1 (on-policy data, as in DistillSpec), generated at the start of the run; the rest is the
corpus. Agreement is reported both on real held-out text and along the target's own greedy output,
the quantity a greedy speculative step depends on.

What it writes into DIR: `nexus-tiny-draft/` (config.json, model.safetensors in bf16, tokenizer files;
transformers' AutoModelForCausalLM loads it) and `distill.json`: the recipe, the training log, and greedy
agreement with the target before (the shipped draft) and after, on held-out standard-library files and
on Python code from outside the standard library (a fixed list of pip's source files).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..generate import generate
from ..loading import ASSETS, load_model
from ..model import Transformer
from .corpus import Document, build_splits, load_tokens, read_source, tokenize_documents
from .evaluate import heldout_metrics, model_summary
from .recipe import DRAFT_CONFIG, TARGET_CONFIG, check_draft_budget, cost_report
from .tokenizer import copy_tokenizer_files, eos_id, load_tokenizer
from .train import (Schedule, device_name, distill_loss, init_from_target, init_weights, save_shipped, train_model,
                    versions)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "course" / "results" / "tiny_draft_distill.json"
# Python code the models never saw: pip's own sources (pip is beside every Python). Files a pip version
# lacks are skipped and the list actually read is recorded.
OUTSIDE_FILES = (
    "_internal/req/req_install.py", "_internal/cli/base_command.py", "_internal/operations/prepare.py",
    "_internal/index/package_finder.py", "_internal/resolution/resolvelib/factory.py", "_internal/utils/misc.py",
    "_internal/network/session.py", "_internal/commands/install.py", "_internal/wheel_builder.py",
    "_internal/models/link.py", "_internal/vcs/versioncontrol.py", "_internal/metadata/base.py",
    "_internal/configuration.py", "_internal/req/req_file.py", "_internal/cli/cmdoptions.py",
)


def log(msg: str) -> None:
    print(f"[distill] {msg}", flush=True)


def outside_documents() -> tuple[list[Document], dict[str, Any]]:
    """pip's files from OUTSIDE_FILES that exist here, and what was read (pip version, paths)."""
    spec = importlib.util.find_spec("pip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pip is not installed here: the outside-the-stdlib evaluation reads its sources")
    root = Path(spec.origin).parent
    docs = [Document(f"pip/{rel}", text) for rel in OUTSIDE_FILES
            if (root / rel).exists() and (text := read_source(root / rel)) is not None]
    import pip

    return docs, {"pip_version": pip.__version__, "files": [d.path for d in docs]}


def corpus_tokens(tokens_file: Path | None, tokenizer_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train, held-out) token streams: the prepared corpus if given, else this machine's stdlib tokenized
    here with the shipped tokenizer (the split is by path, so held-out files stay held out)."""
    if tokens_file is not None:
        train, heldout, meta = load_tokens(tokens_file)
        return train, heldout, {k: v for k, v in meta.items() if k != "heldout_paths"}
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    splits = build_splits()
    eos = eos_id(tok)
    train, heldout = tokenize_documents(tok, splits.train, eos), tokenize_documents(tok, splits.heldout, eos)
    log(f"tokenized this machine's stdlib in {time.perf_counter() - t0:.1f}s: {splits.summary()}")
    return train, heldout, {**splits.summary(), "python": sys.version.split()[0]}


def windows_of(tokens: np.ndarray, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`rows` random windows of `length` tokens, [rows, length] int64."""
    starts = torch.randint(0, tokens.size - length, (rows,), generator=generator).tolist()
    return torch.stack([torch.from_numpy(tokens[s:s + length].astype(np.int64)) for s in starts])


@torch.no_grad()
def target_continuations(target, tokens: np.ndarray, *, rounds: int, rows: int, prompt_len: int, new_tokens: int,
                         seed: int, eos: int) -> np.ndarray:
    """The target's own text: continuations of random corpus windows, alternately greedy and sampled at
    temperature 1, as one flat uint16 stream (eos between sequences)."""
    g = torch.Generator().manual_seed(seed)
    sampler = torch.Generator(device=target.device).manual_seed(seed)
    pieces = []
    for r in range(rounds):
        prompts = windows_of(tokens, rows, prompt_len, g).to(target.device)
        out = generate(target, prompts, new_tokens, cache="static", temperature=0.0 if r % 2 == 0 else 1.0,
                       generator=sampler)
        for row in out.cpu().numpy():
            pieces += [np.array([eos]), row]
    return np.concatenate(pieces).astype(np.uint16)


@torch.no_grad()
def agreement_on_target_output(target, draft, tokens: np.ndarray, *, rows: int, prompt_len: int,
                               new_tokens: int, seed: int = 1234) -> float:
    """How often the draft's greedy token equals the target's along the target's own greedy continuation
    of held-out windows (what a greedy speculative step accepts)."""
    prompts = windows_of(tokens, rows, prompt_len, torch.Generator().manual_seed(seed)).to(target.device)
    full = generate(target, prompts, new_tokens, cache="static")
    guess = draft(full)[:, prompt_len - 1:-1].argmax(-1)
    return round(float((guess == full[:, prompt_len:]).float().mean()), 4)


def agreement(target, draft, tokens: np.ndarray, context: int, max_tokens: int, rows: int) -> dict[str, Any]:
    m = heldout_metrics(target, draft, tokens[:max_tokens], context)
    return {"tokens": m["tokens"], "greedy_agreement": m["greedy_agreement"],
            "expected_acceptance_t1": m["expected_acceptance_t1"], "draft_loss": m["draft"]["loss"],
            "target_loss": m["target"]["loss"],
            "greedy_agreement_on_target_output": agreement_on_target_output(
                target, draft, tokens, rows=rows, prompt_len=64, new_tokens=128)}


def evaluate_drafts(target_dir, drafts: dict[str, Path | str], sets: dict[str, np.ndarray], device, context: int,
                    max_tokens: int, rows: int = 64) -> dict[str, Any]:
    """Greedy agreement (and T=1 acceptance) of each draft with the target, in float32, on each token set."""
    target, _ = load_model(target_dir, device=device, dtype=torch.float32, tokenizer=False)
    out = {}
    for name, path in drafts.items():
        draft, _ = load_model(path, device=device, dtype=torch.float32, tokenizer=False)
        out[name] = {"model": model_summary(draft),
                     **{s: agreement(target, draft, toks, context, max_tokens, rows) for s, toks in sets.items()}}
        log(f"{name}: " + ", ".join(f"{s} agreement {out[name][s]['greedy_agreement']} (along the target's "
                                    f"output {out[name][s]['greedy_agreement_on_target_output']})" for s in sets))
    return out


CARD_BEGIN, CARD_END = "<!-- begin: tiny.distill -->", "<!-- end: tiny.distill -->"


def card_section(r: dict[str, Any]) -> str:
    """The model card's section on the shipped draft, written from distill.json."""
    after, before = r["agreement"]["after"], r["agreement"]["before"]
    m, t = after["model"], r["training"]
    rows = [("greedy agreement with the target", "greedy_agreement"),
            ("... along the target's own greedy output", "greedy_agreement_on_target_output"),
            ("expected acceptance, T = 1", "expected_acceptance_t1"), ("draft loss (nats/token)", "draft_loss")]
    table = ["| measure | before: held-out stdlib | before: pip | after: held-out stdlib | after: pip |",
             "|---|---|---|---|---|"]
    for label, key in rows:
        table.append(f"| {label} | " + " | ".join(f"{x[s][key]}" for x in (before, after)
                                                  for s in ("heldout_stdlib", "outside_stdlib")) + " |")
    return "\n".join([
        CARD_BEGIN,
        "## The shipped draft: distilled by `tiny.distill`",
        "",
        f"`nexus-tiny-draft` has {m['num_hidden_layers']} layer(s) of hidden {m['hidden_size']} "
        f"({m['num_attention_heads']} / {m['num_key_value_heads']} heads, SwiGLU {m['intermediate_size']}; "
        f"{m['params']:,} parameters), started from {r['recipe']['init']} and trained on KL(target || draft) "
        f"over the whole vocabulary: {t['steps_done']} steps of {t['schedule']['batch_size']} x "
        f"{t['schedule']['context']} tokens in {t['wall_s']} s ({r['device']}, {r['date']}).",
        "",
        f"Greedy agreement with the target, float32, before (the previous draft: "
        f"{before['model']['num_hidden_layers']} layers, hidden {before['model']['hidden_size']}) and after, on "
        f"{after['heldout_stdlib']['tokens']:,} held-out standard-library tokens and "
        f"{after['outside_stdlib']['tokens']:,} tokens of pip {r['outside_stdlib']['pip_version']}'s sources "
        "(code from outside the standard library); from `course/results/tiny_draft_distill.json`:",
        "",
        *table,
        "",
        f"Command: `{r['command']}`, then `python -m nexus_lessons.tiny.distill --install DIR`.",
        CARD_END,
    ])


def install(src: Path, assets: Path = ASSETS, results: Path = RESULTS) -> None:
    """Copy DIR/nexus-tiny-draft (weights + config) into the assets, DIR/distill.json into course/results,
    and rewrite the model card's section on the draft from it."""
    dst = assets / "nexus-tiny-draft"
    for f in ("config.json", "model.safetensors"):
        (dst / f).write_bytes((src / "nexus-tiny-draft" / f).read_bytes())
    copy_tokenizer_files(assets / "tokenizer", dst)
    load_model(dst)  # fails loudly on anything malformed
    results.write_bytes((src / "distill.json").read_bytes())
    card = assets / "MODEL_CARD.md"
    text = card.read_text()
    head, rest = text.split(CARD_BEGIN, 1)
    card.write_text(head + card_section(json.loads(results.read_text())) + rest.split(CARD_END, 1)[1])
    log(f"installed {dst}, {results} and the draft section of {card}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="writes nexus-tiny-draft/ and distill.json here")
    p.add_argument("--install", type=Path, default=None, help="copy a finished run's draft and JSON into place")
    p.add_argument("--tokens-file", type=Path, default=None,
                   help="a prepared corpus (`python -m nexus_lessons.tiny.prepare`); default: tokenize here")
    p.add_argument("--target", default="nexus-tiny")
    p.add_argument("--before", default="nexus-tiny-draft", help="the draft to compare against")
    p.add_argument("--init-from", default=None,
                   help="start the student from this model (a name or folder; its shape is kept) instead of "
                        "the target cut down to one layer")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--minutes", type=float, default=3.5, help="wall-clock budget for training")
    p.add_argument("--eval-tokens", type=int, default=120_000, help="tokens of each evaluation set")
    p.add_argument("--generated-rounds", type=int, default=16,
                   help="rounds of the target's own continuations (each: rows x (64 + 448) tokens)")
    p.add_argument("--generated-rows", type=int, default=512)
    p.add_argument("--smoke", action="store_true", help="CPU: 4 steps of 2 x 64 tokens, small evaluation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.install is not None:
        install(a.install)
        return {}
    if a.out is None:
        raise SystemExit("give --out DIR (or --install DIR)")
    wall0 = time.perf_counter()
    command = " ".join(["python", "-m", "nexus_lessons.tiny.distill", *(sys.argv[1:] if argv is None else argv)])
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.smoke:
        a.steps, a.batch_size, a.context, a.warmup, a.eval_tokens = 4, 2, 64, 2, 2048
        a.generated_rounds, a.generated_rows = 2, 2
    tokenizer_dir = ASSETS / "tokenizer"
    check_draft_budget(TARGET_CONFIG, DRAFT_CONFIG)

    # 1. data: the corpus' streams, and code from outside it
    if a.smoke and a.tokens_file is None:
        tok = load_tokenizer(tokenizer_dir)
        splits = build_splits(max_files=20)
        train, heldout = (tokenize_documents(tok, s, eos_id(tok)) for s in (splits.train, splits.heldout))
        meta = {**splits.summary(), "smoke": True}
    else:
        train, heldout, meta = corpus_tokens(a.tokens_file, tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    outside_docs, outside_meta = outside_documents()
    outside = tokenize_documents(tok, outside_docs, eos_id(tok))
    sets = {"heldout_stdlib": heldout, "outside_stdlib": outside}
    log(f"train {train.size:,} tokens; held-out stdlib {heldout.size:,}; outside (pip) {outside.size:,}")

    # 2. the target's own continuations join the corpus (on-policy data)
    torch.manual_seed(a.seed)
    teacher, _ = load_model(a.target, device=device, tokenizer=False)  # the shipped bf16 weights, exact in fp32
    teacher.requires_grad_(False)
    t0 = time.perf_counter()
    new_tokens = 16 if a.smoke else 448
    generated = target_continuations(teacher, train, rounds=a.generated_rounds, rows=a.generated_rows,
                                     prompt_len=64, new_tokens=new_tokens, seed=a.seed, eos=eos_id(tok))
    meta["generated"] = {"tokens": int(generated.size), "rounds": a.generated_rounds, "rows": a.generated_rows,
                         "prompt_len": 64, "new_tokens": new_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    log(f"the target's own continuations: {generated.size:,} tokens in {meta['generated']['seconds']}s")
    train = np.concatenate([train, generated])

    # 3. the student (the target cut down, or --init-from), trained on the target's distributions
    if a.init_from is None:
        draft = Transformer(DRAFT_CONFIG)
        init_weights(draft)
        init_from_target(draft, teacher)
        draft.to(device)
        init = "the target's embedding, first layer and final norm"
    else:  # e.g. the shipped draft: distillation then refines a model that already agrees with the target
        draft, _ = load_model(a.init_from, device=device, dtype=torch.float32, tokenizer=False)
        check_draft_budget(TARGET_CONFIG, draft.config)
        init = f"the weights of {a.init_from}"
    every = {"eval_every": 2, "log_every": 2, "eval_windows": 2} if a.smoke else {"eval_every": 500}
    schedule = Schedule(a.steps, a.batch_size, a.context, a.lr, a.warmup, max_minutes=a.minutes, seed=a.seed, **every)
    run = train_model("nexus-tiny-draft", draft, distill_loss(teacher, 0.0), train, heldout, schedule, device,
                      compile_model=False)
    out = Path(a.out)
    draft_dir = save_shipped(draft, out / "nexus-tiny-draft", tokenizer_dir)
    draft_config = draft.config
    del teacher, draft
    log(f"saved {draft_dir}")

    # 4. before and after, on both sets
    results = {
        "command": command, "device": device_name(device), "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": a.seed, "smoke": a.smoke,
        "corpus": meta, "outside_stdlib": outside_meta,
        "recipe": {"init": init, "loss": "KL(target || draft)",
                   "draft_config": asdict(draft_config), "schedule": asdict(schedule)},
        "cost": cost_report(TARGET_CONFIG, draft_config), "training": asdict(run),
    }
    results["agreement"] = evaluate_drafts(a.target, {"before": a.before, "after": draft_dir}, sets, device,
                                           context=min(a.context, 1024), max_tokens=a.eval_tokens,
                                           rows=4 if a.smoke else 64)
    results["wall_s"] = round(time.perf_counter() - wall0, 1)
    (out / "distill.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {out / 'distill.json'}; all done in {results['wall_s']}s")
    return results


if __name__ == "__main__":
    main()
