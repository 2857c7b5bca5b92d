"""Train `nexus-tiny` and then distill `nexus-tiny-draft` from it, in one run; then evaluate both.

The GPU run that made the shipped models (one H200, 3.3 minutes; brings back 7 files):

    set -o pipefail; PYTHONUNBUFFERED=1 python -m nexus_lessons.tiny.train --tokens-file .carry/tiny_data --out /tmp/tiny --export $OUT/tiny --steps 1100 --max-minutes 1.5 --draft-max-minutes 2.3 2>&1 | tee $OUT/tiny_stdout.txt

(Those are the defaults now. A first run with 2500 target steps overfit: held-out loss bottomed near
step 1000, and the draft distilled from it agreed with it on only 0.585 of held-out positions.)

(carry `.carry/tiny_data`). It writes complete HF folders under /tmp/tiny, evaluates them (held-out
loss, draft/target agreement, samples: `evaluate.py`), and exports to $OUT/tiny the files that matter:
nexus-tiny/{config.json,model.safetensors}, nexus-tiny-draft/{...}, train_log.json, tiny_models.json.
Then, here: `python -m nexus_lessons.tiny.install <fetched>/tiny` puts the models into
`nexus_lessons/assets/` (with the shipped tokenizer files) and the JSON into `course/results/`.

`.carry/tiny_data` comes from `python -m nexus_lessons.tiny.prepare` (CPU, ~20 s), which also writes the
tokenizer to `nexus_lessons/assets/tokenizer/`. A CPU smoke run of the whole pipeline (seconds):
`python -m nexus_lessons.tiny.train --toy --out /tmp/tiny_toy`.

Recipe (see `recipe.py` for the shapes): fixed seed; GPT-style init (normal 0.02, residual projections
scaled by 1/sqrt(2 * layers)); AdamW (0.9, 0.95), weight decay 0.1 on matrices only, gradient clipping
1.0; linear warmup then cosine decay to 10% of the peak; bf16 autocast on the GPU with float32 master
weights; random 1024-token windows of the token stream (files separated by eos); attention through
`scaled_dot_product_attention(is_causal=True)` (flash on the GPU). The draft is trained on
KL(target || draft) over the whole vocabulary (optionally mixed with next-token cross-entropy), with
the *saved* target (bf16-rounded weights, as shipped) as the teacher; a draft as wide as the target
starts as the target's embedding, first layers and final norm. (`nexus_lessons.tiny.distill` redoes
only the draft, from the shipped target: that is how the shipped draft is made.)

`--max-minutes` is a wall-clock budget per model: after a few timed steps the step count is cut to fit
(the cosine schedule is laid over the steps that will actually run), and a hard stop guards the rest;
the final save and evaluation always run. Weights are saved in bf16 (the asset budget is ~24 MiB;
bf16 values are exact in float32, which the course computes in).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..loading import load_model, save_pretrained
from ..model import Transformer
from .corpus import build_splits, load_tokens, tokenize_documents
from .prepare import DEFAULT_TOKENIZER_DIR
from .recipe import (
    DRAFT_CONFIG,
    TARGET_CONFIG,
    TOY_DRAFT_CONFIG,
    TOY_TARGET_CONFIG,
    TRAIN_CONTEXT,
    check_draft_budget,
    cost_report,
)
from .tokenizer import copy_tokenizer_files, eos_id, load_tokenizer, tokenizer_sha256

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def log(msg: str) -> None:
    print(f"[tiny] {msg}", flush=True)


@dataclass
class Schedule:
    """How one model is trained; every field lands in train_log.json."""

    steps: int
    batch_size: int
    context: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_minutes: float = 4.0
    eval_every: int = 250
    log_every: int = 100
    eval_windows: int = 32
    seed: int = 0

    def lr_at(self, step: int, total: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class RunLog:
    name: str
    schedule: dict[str, Any]
    config: dict[str, Any]
    params: int
    steps_planned: int = 0
    steps_done: int = 0
    stopped_by: str = ""
    wall_s: float = 0.0
    tokens_seen: int = 0
    tokens_per_s: float = 0.0
    compiled: bool = False
    losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


# --- pieces -------------------------------------------------------------------------------------

def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style: N(0, 0.02) for every matrix, residual output projections shrunk by sqrt(2 * layers)."""
    resid_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


@torch.no_grad()
def init_from_target(draft: Transformer, target: Transformer) -> Transformer:
    """Start the draft as the target cut down: its embedding (tied to the lm_head), final norm and first
    layers. Needs the same width; the draft then learns to do in one layer what the target does in eight."""
    dc, tc = draft.config, target.config
    if (dc.hidden_size, dc.intermediate_size, dc.num_attention_heads, dc.num_key_value_heads) != (
            tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads):
        raise ValueError("init_from_target needs a draft with the target's layer shape")
    draft.embed_tokens.weight.copy_(target.embed_tokens.weight)
    draft.norm.weight.copy_(target.norm.weight)
    for mine, theirs in zip(draft.layers, target.layers):
        mine.load_state_dict(theirs.state_dict())
    if not dc.tie_word_embeddings:
        draft.lm_head.weight.copy_(target.lm_head.weight)
    return draft


def make_optimizer(model: torch.nn.Module, s: Schedule, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=device.type == "cuda")


class Batches:
    """Random windows of `context + 1` tokens from one flat stream, drawn with a seeded generator."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int, device: torch.device):
        if tokens.size < context + 2:
            raise ValueError(f"the token stream ({tokens.size}) is shorter than one window ({context + 1})")
        self.data = torch.from_numpy(tokens.astype(np.int32)).to(device)
        self.batch_size, self.context, self.device = batch_size, context, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.span = torch.arange(context + 1, device=device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.data.numel() - self.context - 1, (self.batch_size,),
                               generator=self.gen, device=self.device)
        w = self.data[starts[:, None] + self.span].long()
        return w[:, :-1], w[:, 1:]


def eval_windows(tokens: np.ndarray, context: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` non-overlapping windows of the held-out stream (same ones every eval)."""
    n = max(1, min(n, (tokens.size - 1) // context))
    w = torch.from_numpy(tokens[: n * context + 1].astype(np.int64))
    x = torch.stack([w[i * context:(i + 1) * context] for i in range(n)])
    y = torch.stack([w[i * context + 1:(i + 1) * context + 1] for i in range(n)])
    return x.to(device), y.to(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere (the CPU toy run)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def ce_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss, {}


def distill_loss(teacher: Callable[[torch.Tensor], torch.Tensor], ce_weight: float) -> LossFn:
    """KL(teacher || student) per token over the vocabulary, plus `ce_weight` x next-token CE."""

    def fn(student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(x).float().flatten(0, 1), dim=-1)
        s_logits = student(x).float().flatten(0, 1)
        s_logp = F.log_softmax(s_logits, dim=-1)
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        ce = F.nll_loss(s_logp, y.flatten())
        loss = (1 - ce_weight) * kl + ce_weight * ce if ce_weight else kl
        agree = (s_logits.argmax(-1) == t_logp.argmax(-1)).float().mean()
        return loss, {"kl": kl.detach(), "ce": ce.detach(), "agree": agree}

    return fn


def forward_backward(loss_fn: LossFn, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    with autocast(device):
        loss, extra = loss_fn(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss, extra


class TeacherFallback:
    """The teacher, compiled when asked; if the compiled forward fails on first use, eager from then on."""

    def __init__(self, module: torch.nn.Module, compile_model: bool) -> None:
        self.eager = module
        self.fn = maybe_compile(module, compile_model)
        self.checked = self.fn is module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.fn(x)
        try:
            out = self.fn(x)
        except Exception as e:  # noqa: BLE001 - compile is an optimisation
            log(f"compiled teacher failed ({type(e).__name__}: {str(e)[:300]}); teacher runs eager")
            self.fn = self.eager
            out = self.fn(x)
        self.checked = True
        return out


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 - compile is an optimisation; never let it kill the run
        log(f"torch.compile unavailable ({type(e).__name__}: {e}); running eager")
        return model


@torch.no_grad()
def eval_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for i in range(0, x.shape[0], 8):
        with autocast(device):
            logits = model(x[i:i + 8])
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the loop -----------------------------------------------------------------------------------

def train_model(name: str, model: Transformer, loss_fn: LossFn, train: np.ndarray, heldout: np.ndarray,
                s: Schedule, device: torch.device, compile_model: bool) -> RunLog:
    """Train `model` in place under the schedule and its wall-clock budget; return the log."""
    run = RunLog(name, asdict(s), asdict(model.config), model.config.num_parameters)
    model.train()
    opt = make_optimizer(model, s, device)
    batches = Batches(train, s.batch_size, s.context, s.seed, device)
    ex, ey = eval_windows(heldout, s.context, s.eval_windows, device)
    fast = maybe_compile(model, compile_model)
    run.compiled = fast is not model
    budget = s.max_minutes * 60
    planned, step = s.steps, 0
    calib: tuple[int, float] | None = None  # (step, time) where timing starts, after compile/warm-up
    t0 = time.perf_counter()
    run.stopped_by = "steps"
    log(f"{name}: {run.params:,} params, {s.steps} steps x {s.batch_size} x {s.context} tokens, "
        f"budget {s.max_minutes} min, device {device}, compile {run.compiled}")
    while step < planned:
        lr = s.lr_at(step, planned)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.next()
        try:
            loss, extra = forward_backward(loss_fn, fast, opt, x, y, device)
        except Exception as e:  # only the first compiled step may fall back
            if fast is model or step > 0:
                raise
            log(f"compiled step failed ({type(e).__name__}: {str(e)[:300]}); falling back to eager")
            fast, run.compiled = model, False
            loss, extra = forward_backward(loss_fn, fast, opt, x, y, device)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        step += 1
        if step == 10:
            sync(device)
            calib = (step, time.perf_counter())
        if calib is not None and step > calib[0] and (step in (25, 50) or step % s.log_every == 0):
            sync(device)  # re-plan: cut the steps (and so the cosine) so that the budget holds
            now = time.perf_counter() - t0
            per_step = (time.perf_counter() - calib[1]) / (step - calib[0])
            fits = max(step, step + int((budget * 0.97 - now) / per_step))
            if fits < planned:
                log(f"{name}: {per_step * 1e3:.1f} ms/step; cutting steps {planned} -> {fits} to fit the budget")
                planned, run.stopped_by = fits, "budget (planned)"
        if step % s.log_every == 0 or step == planned:
            sync(device)
            now = time.perf_counter() - t0
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}; lower the learning rate")
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": float(f"{lr:.4g}"),
                   "grad_norm": round(float(gnorm), 3), "elapsed_s": round(now, 1),
                   **{k: round(float(v), 4) for k, v in extra.items()}}
            run.losses.append(rec)
            log(" ".join(f"{k}={v}" for k, v in rec.items()))
        if step % s.eval_every == 0 or step == planned:
            ev = {"step": step, "heldout_loss": round(eval_loss(model, ex, ey, device), 4)}
            run.evals.append(ev)
            log(f"{name}: eval {ev}")
        if time.perf_counter() - t0 > budget and step < planned:
            log(f"{name}: wall-clock budget of {s.max_minutes} min reached at step {step}; stopping")
            run.stopped_by = "budget (hard stop)"
            break
    sync(device)
    run.steps_planned, run.steps_done = planned, step
    run.wall_s = round(time.perf_counter() - t0, 1)
    run.tokens_seen = step * s.batch_size * s.context
    run.tokens_per_s = round(run.tokens_seen / max(run.wall_s, 1e-9))
    if not run.evals or run.evals[-1]["step"] != step:
        run.evals.append({"step": step, "heldout_loss": round(eval_loss(model, ex, ey, device), 4)})
    log(f"{name}: done, {step} steps in {run.wall_s}s ({run.tokens_per_s:,} tokens/s), "
        f"held-out loss {run.evals[-1]['heldout_loss']}")
    model.eval()
    return run


def save_shipped(model: Transformer, folder: Path, tokenizer_dir: Path) -> Path:
    """HF folder with bf16 weights and the shared tokenizer files, loadable by `load_model` and transformers."""
    cpu = copy.deepcopy(model).to(device="cpu", dtype=torch.bfloat16)
    save_pretrained(cpu, folder)
    copy_tokenizer_files(tokenizer_dir, folder)
    return folder


def reuse_target(src: Path, dst: Path, tokenizer_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Copy an already trained target (a folder with config.json + model.safetensors) into the run."""
    if not (src / "model.safetensors").exists():
        raise FileNotFoundError(f"--target-from {src}: no model.safetensors there")
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        for f in ("config.json", "model.safetensors"):
            (dst / f).write_bytes((src / f).read_bytes())
    copy_tokenizer_files(tokenizer_dir, dst)
    earlier = src.parent / "train_log.json"
    run = json.loads(earlier.read_text()).get("target", {}) if earlier.exists() else {}
    log(f"nexus-tiny: reusing the trained target from {src}")
    return dst, {**run, "reused_from": str(src)}


# --- the command ----------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    import tokenizers
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "tokenizers": tokenizers.__version__, "numpy": np.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = "not installed"
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_corpus(args: argparse.Namespace, tokenizer_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    tok = load_tokenizer(tokenizer_dir)
    if args.tokens_file is not None:
        train, heldout, meta = load_tokens(args.tokens_file)
        sha = tokenizer_sha256(tokenizer_dir)
        if meta.get("tokenizer_sha256") not in (None, sha):
            raise ValueError(f"{args.tokens_file} was tokenized with a different tokenizer than {tokenizer_dir} "
                             "(sha256 differs); re-run `python -m nexus_lessons.tiny.prepare`")
        return train, heldout, meta
    if not args.toy:
        raise ValueError("give --tokens-file (from `python -m nexus_lessons.tiny.prepare`), or --toy")
    splits = build_splits(max_files=20)  # toy: a few files, tokenized here
    eos = eos_id(tok)
    meta = {**splits.summary(), "heldout_paths": [d.path for d in splits.heldout], "toy": True}
    return tokenize_documents(tok, splits.train, eos), tokenize_documents(tok, splits.heldout, eos), meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train nexus-tiny and distill nexus-tiny-draft, then evaluate both.")
    p.add_argument("--out", type=Path, required=True, help="writes nexus-tiny/, nexus-tiny-draft/, train_log.json")
    p.add_argument("--tokens-file", type=Path, default=None, help="folder from `python -m nexus_lessons.tiny.prepare`")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER_DIR)
    p.add_argument("--toy", action="store_true",
                   help="tiny shapes, 30 steps of 4 x 64 tokens each (overrides the step/batch/context options): "
                        "a CPU smoke test of the whole pipeline in seconds")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (falls back to eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context", type=int, default=TRAIN_CONTEXT)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--max-minutes", type=float, default=1.5, help="wall-clock budget for the target")
    p.add_argument("--draft-steps", type=int, default=6000)
    p.add_argument("--draft-batch-size", type=int, default=64)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--draft-warmup", type=int, default=100)
    p.add_argument("--draft-max-minutes", type=float, default=2.3, help="wall-clock budget for the draft")
    p.add_argument("--draft-ce-weight", type=float, default=0.0,
                   help="loss = (1 - w) KL(target || draft) + w CE(next token)")
    p.add_argument("--target-from", type=Path, default=None,
                   help="skip training the target: distill the draft from this trained target folder")
    p.add_argument("--no-eval", action="store_true", help="skip nexus_lessons.tiny.evaluate at the end")
    p.add_argument("--results", type=Path, default=None, help="evaluation JSON (default: OUT/tiny_models.json)")
    p.add_argument("--export", type=Path, default=None,
                   help="also copy the 6 files that matter (each model's config.json + model.safetensors, "
                        "train_log.json, tiny_models.json) here; `python -m nexus_lessons.tiny.install` takes it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    command = " ".join(["python", "-m", "nexus_lessons.tiny.train", *(sys.argv[1:] if argv is None else argv)])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only stray float32 matmuls; the model runs in bf16
    target_cfg, draft_cfg = (TOY_TARGET_CONFIG, TOY_DRAFT_CONFIG) if args.toy else (TARGET_CONFIG, DRAFT_CONFIG)
    if not args.toy:  # toy shapes are all lm_head; the budget is about the real pair
        check_draft_budget(target_cfg, draft_cfg)
    if args.toy:
        args.steps, args.draft_steps, args.batch_size, args.draft_batch_size, args.context = 30, 30, 4, 4, 64
        args.warmup = args.draft_warmup = 5
    train, heldout, meta = load_corpus(args, args.tokenizer)
    vocab = int(load_tokenizer(args.tokenizer).get_vocab_size())
    if vocab != target_cfg.vocab_size:
        raise ValueError(f"tokenizer has {vocab} tokens, the model config expects {target_cfg.vocab_size}")
    log(f"corpus: train {train.size:,} tokens, held-out {heldout.size:,} tokens; device {device_name(device)}")
    every = {"eval_every": 10, "log_every": 10, "eval_windows": 4} if args.toy else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1) the target, from scratch (or an earlier run's, to redo only the draft)
    if args.target_from is not None:
        target_dir, run_t = reuse_target(Path(args.target_from), out / "nexus-tiny", args.tokenizer)
    else:
        torch.manual_seed(args.seed)
        target = Transformer(target_cfg)
        init_weights(target)
        target.to(device)
        s_target = Schedule(args.steps, args.batch_size, args.context, args.lr, args.warmup,
                            max_minutes=args.max_minutes, seed=args.seed, **every)
        run_t = asdict(train_model("nexus-tiny", target, ce_loss, train, heldout, s_target, device, args.compile))
        target_dir = save_shipped(target, out / "nexus-tiny", args.tokenizer)
        del target

    # 2) the draft, distilled from the target as shipped (bf16-rounded weights)
    teacher, _ = load_model(target_dir, device=device, tokenizer=False)
    teacher.requires_grad_(False)
    teacher_fast = TeacherFallback(teacher, args.compile)
    torch.manual_seed(args.seed + 1)
    draft = Transformer(draft_cfg)
    init_weights(draft)
    if draft_cfg.hidden_size == target_cfg.hidden_size and draft_cfg.intermediate_size == target_cfg.intermediate_size:
        init_from_target(draft, teacher)
    draft.to(device)
    s_draft = Schedule(args.draft_steps, args.draft_batch_size, args.context, args.draft_lr, args.draft_warmup,
                       max_minutes=args.draft_max_minutes, seed=args.seed + 1, **every)
    run_d = asdict(train_model("nexus-tiny-draft", draft, distill_loss(teacher_fast, args.draft_ce_weight),
                               train, heldout, s_draft, device, args.compile))
    draft_dir = save_shipped(draft, out / "nexus-tiny-draft", args.tokenizer)
    del teacher, teacher_fast, draft
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.backends.cuda.matmul.allow_tf32 = False

    train_log = {
        "command": command, "device": device_name(device), "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed, "toy": args.toy,
        "corpus": {k: v for k, v in meta.items() if k != "heldout_paths"},
        "cost": cost_report(target_cfg, draft_cfg), "draft_loss": {"ce_weight": args.draft_ce_weight},
        "target": run_t, "draft": run_d,
        "wall_s_training": round(time.perf_counter() - wall0, 1),
    }
    results_path = args.results or out / "tiny_models.json"
    write_log(train_log, out, args.export)  # first, so the weights come back even if evaluation fails
    log(f"saved {target_dir}, {draft_dir}, {out / 'train_log.json'}")

    if not args.no_eval:
        from .evaluate import evaluate, write_results

        results = evaluate(target_dir, draft_dir, heldout, device=device, context=args.context,
                           max_tokens=4096 if args.toy else None, max_new_tokens=8 if args.toy else 64)
        results.update(command=command, train_log=str(out / "train_log.json"),
                       training={"target_steps": run_t.get("steps_done"), "draft_steps": run_d["steps_done"],
                                 "target_wall_s": run_t.get("wall_s"), "draft_wall_s": run_d["wall_s"]})
        write_results(results, results_path)
        train_log["evaluation"] = str(results_path)
    train_log["wall_s_total"] = round(time.perf_counter() - wall0, 1)
    write_log(train_log, out, args.export, results_path)
    log(f"all done in {train_log['wall_s_total']}s")
    return train_log


def write_log(train_log: dict[str, Any], out: Path, export_dir: Path | None, results: Path | None = None) -> None:
    (out / "train_log.json").write_text(json.dumps(train_log, indent=2, default=str) + "\n")
    if export_dir is not None:
        export(out, export_dir, results)


EXPORT_LIMIT_BYTES = 16 * 2**20  # the GPU machine returns files of at most 16 MiB


def export(out: Path, dst: Path, results: Path | None = None) -> None:
    """The minimal set of files to bring back (the tokenizer files are the shipped ones, not copied)."""
    files = [out / m / f for m in ("nexus-tiny", "nexus-tiny-draft") for f in ("config.json", "model.safetensors")]
    for src in files:
        (dst / src.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / src.parent.name / src.name).write_bytes(src.read_bytes())
        if src.stat().st_size > EXPORT_LIMIT_BYTES:
            log(f"WARNING: {src} is {src.stat().st_size / 2**20:.2f} MiB, over the 16 MiB the device returns")
    (dst / "train_log.json").write_bytes((out / "train_log.json").read_bytes())
    if results is not None and results.exists():
        (dst / "tiny_models.json").write_bytes(results.read_bytes())
    log(f"exported to {dst}: {sorted(str(p.relative_to(dst)) for p in dst.rglob('*') if p.is_file())}")


if __name__ == "__main__":
    main()
