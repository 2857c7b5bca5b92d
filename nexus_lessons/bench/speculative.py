"""Speculative decoding against plain decoding of the same model, in one run, greedy.

    python -m nexus_lessons.bench speculative --out course/results   # CPU: speculative_cpu.json
    python -m nexus_lessons.bench speculative --out DIR              # GPU: speculative_gpu.json (+ 1B projection)
    python -m nexus_lessons.bench speculative --out DIR --smoke      # seconds: random toy models, a test runs it

Workloads (prompts from code the models never trained on: held-out standard-library files and pip's
sources):
* `completion`: continue a file from a window of it;
* `edit`: the prompt holds a previous version of the text the model is about to write (the window,
  the target's own continuation of it, a blank line, the window again), as when an editor re-emits a
  file after a local change. nexus-tiny cannot copy text it has read (it has no working induction
  heads: the lesson shows it), so the previous version is its own output, not arbitrary text.

Sides, all on `nexus-tiny` in float32 (on a GPU with `fuse_projections(fused_gemv=True)`, as
`SpeculativeDecoder` and the engine run it, so forwards of <= 4 tokens use the GEMV kernels): plain
cached decode (`generate(cache="static")` on a CPU, the CUDA-graph decoder `CUDAGraphDecoder` on a GPU),
ours with the draft model and with n-gram lookup over a range of k (CUDA graphs on a GPU), and
transformers' `generate` plain, with `assistant_model=` and with
`prompt_lookup_num_tokens=` on the same weights. Before timing, every side's tokens are compared with
plain `generate`: ours must be equal (asserted); transformers' are recorded.

The cost model (section 3 of the lesson): with per-draft acceptance alpha, a step yields
E = (1 - alpha^(k+1)) / (1 - alpha) tokens and costs k draft steps plus one verification, so
speedup = E / (k c + v), c = draft step / target step, v = verify forward / target step (v = 1 is the
textbook E / (1 + k c)). alpha is measured on its own: how often the draft's greedy token equals the
target's along the target's output (one forward of each over the finished text). c and v come from the
phase timers of the timed runs, against plain decode's time per token with its prompt processing taken
out. The model is about decode steps, so its prediction is set against the decode-phase speed-up (new
tokens x plain decode time per token / time in draft and verify phases) at every k; the end-to-end
speed-up (prompt processing included, both sides) is the headline figure beside it.

On a GPU it also times a 1B Llama-shaped target and a draft of the same recipe (one layer of the
target's shape) with random weights and applies the tiny pair's measured alpha: a projection, labelled so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..cuda_graph import CUDAGraphDecoder
from ..generate import generate
from ..loading import ASSETS, load_model
from ..speculative import NGramSpeculator, SpeculativeDecoder
from .common import environment, save_json, top_kernels

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rms_norm_eps=1e-5)


# --- the cost model ---------------------------------------------------------------------------------

def expected_tokens(alpha: float, k: int) -> float:
    """E[tokens per step] when each draft is accepted independently with probability alpha."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: int, c: float, v: float = 1.0) -> float:
    return expected_tokens(alpha, k) / (k * c + v)


# --- prompts ------------------------------------------------------------------------------------------

def code_prompts(tok, n: int, prompt_len: int, skip: int = 64) -> list[dict[str, Any]]:
    """`prompt_len`-token windows (after the first `skip` tokens) of held-out stdlib files and pip files,
    alternating, in a fixed order."""
    from ..tiny.corpus import is_heldout, list_source_files, read_source, stdlib_root
    from ..tiny.distill import outside_documents

    root = stdlib_root()
    held = [(f"stdlib/{rel}", read_source(root / rel)) for rel in list_source_files(root) if is_heldout(rel)]
    pip = [(d.path, d.text) for d in outside_documents()[0]]
    out = []
    for pair in zip(held, pip):
        for name, text in pair:
            ids = tok(text or "", add_special_tokens=False)["input_ids"]
            if len(ids) >= skip + prompt_len:
                out.append({"source": name, "ids": ids[skip:skip + prompt_len]})
    if len(out) < n:
        raise RuntimeError(f"found only {len(out)} source files long enough for {prompt_len}-token prompts")
    return out[:n]


def edit_prompt(target, ids: list[int], new_tokens: int, sep: list[int]) -> list[int]:
    """window + the target's continuation of it + blank line + window: the previous version is in the prompt."""
    previous = generate(target, torch.tensor([ids], device=target.device), new_tokens, cache="static")[0].tolist()
    return previous + sep + ids


@torch.no_grad()
def teacher_forced_alpha(target, draft, prompt: list[int], output: list[int]) -> tuple[int, int]:
    """(matches, positions): where the draft's greedy token equals the target's output token, given the
    same prefix, over the output positions."""
    full = torch.tensor([prompt + output], device=target.device)
    guess = draft(full)[0, len(prompt) - 1:-1].argmax(-1)
    return int((guess == torch.tensor(output, device=guess.device)).sum()), len(output)


# --- timing ---------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sides(sides: dict[str, Callable[[list[int]], Any]], prompts: list[list[int]], reps: int, device,
               decoders: dict[str, SpeculativeDecoder]) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds per repetition (all prompts) for each side, sides interleaved within a repetition so that a
    slow patch of a shared machine hits them alike; and, for our decoders, their phase timers and
    acceptance summed over the same timed calls."""
    totals = {name: [0.0] * reps for name in sides}
    phases = {name: dict(draft_s=0.0, verify_s=0.0, steps=0, kept=0, offered=0, rejections=0, tokens=0)
              for name in decoders}
    for r in range(reps):
        for ids in prompts:
            for name, fn in sides.items():
                _sync(device)
                t0 = time.perf_counter()
                fn(ids)
                _sync(device)
                totals[name][r] += time.perf_counter() - t0
                if name in decoders:
                    s, ph = decoders[name].last_stats, phases[name]
                    ph["draft_s"] += s.draft_time_s
                    ph["verify_s"] += s.verify_time_s
                    ph["steps"] += s.steps
                    ph["kept"] += sum(s.accepted_per_step)
                    ph["offered"] += sum(s.proposed_per_step)
                    ph["rejections"] += sum(a < p for a, p in zip(s.accepted_per_step, s.proposed_per_step))
                    ph["tokens"] += s.new_tokens
    return totals, phases


def phase_kernels(baseline: CUDAGraphDecoder, decoders: dict[str, SpeculativeDecoder], ids: torch.Tensor,
                  new_tokens: int) -> dict[str, Any]:
    """GPU time per kernel of one replay of each graph: plain decode's step, and each draft decoder's draft
    and verify phases (where c and v go). Each decoder is set up for `ids` first, so replays stay in bounds."""
    baseline.prefill(ids)
    out: dict[str, Any] = {"plain step": top_kernels(baseline._graph(1).replay)}
    for side, dec in decoders.items():
        dec.generate(ids, new_tokens)  # builds (or reuses) its static speculator and graphs
        spec = next(iter(dec._static.values()))
        spec.prefill(ids, torch.zeros(1, dtype=torch.long, device=ids.device), new_tokens, [])
        out[side] = {"draft": top_kernels(spec.graphs[0].replay), "verify": top_kernels(spec.graphs[1].replay)}
    return out


def speedups(totals: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over repetitions of (baseline time / side time), each ratio within one repetition."""
    return {name: statistics.median(b / t for b, t in zip(totals[base], ts)) for name, ts in totals.items()}


# --- one workload ---------------------------------------------------------------------------------------

def run_workload(name: str, target, draft, prompts: list[list[int]], args, hf: dict | None) -> dict[str, Any]:
    dev, n = target.device, args.new_tokens
    on_gpu = dev.type == "cuda"
    longest = max(map(len, prompts)) + n
    t_in = lambda ids: torch.tensor([ids], device=dev)  # noqa: E731
    baseline = CUDAGraphDecoder(target, 1, longest) if on_gpu else None

    def plain(ids):
        if on_gpu:
            return baseline.generate(t_in(ids), n)
        return generate(target, t_in(ids), n, cache="static")

    # The cost model's sweep drafts all k every step (as a CUDA graph does); on a CPU the decoder's default
    # also stops a row's drafting when the draft is unsure (`SpeculativeDecoder.draft_confidence`).
    decoders = {}
    for k in args.draft_k:
        decoders[f"draft k={k}" if on_gpu else f"draft k={k}, all k"] = d = SpeculativeDecoder(target, draft, k)
        d.draft_confidence = 0.0
    if not on_gpu:
        decoders.update({f"draft k={k}": SpeculativeDecoder(target, draft, k) for k in args.stop_k})
    decoders.update({f"ngram k={k}": SpeculativeDecoder(target, NGramSpeculator(3), k) for k in args.ngram_k})
    # Correctness first: every side against plain generate (no cache); ours must be equal.
    want = {i: generate(target, t_in(ids), n)[0].tolist() for i, ids in enumerate(prompts)}
    check = {"plain": all(plain(ids)[0].tolist() == want[i] for i, ids in enumerate(prompts))}
    for side, dec in decoders.items():
        check[side] = all(dec.generate(t_in(ids), n)[0].tolist() == want[i] for i, ids in enumerate(prompts))
    assert all(check.values()), f"{name}: greedy tokens differ from plain generate: {check}"
    sides: dict[str, Callable] = {"plain": plain, "prefill": lambda ids: (
        baseline.generate(t_in(ids), 1) if on_gpu else generate(target, t_in(ids), 1, cache="static"))}
    sides.update({side: (lambda ids, d=dec: d.generate(t_in(ids), n)) for side, dec in decoders.items()})
    if hf is not None:
        hf_sides = {"transformers generate": {},
                    "transformers assisted (draft model)": {"assistant_model": hf["draft"]},
                    f"transformers prompt lookup k={args.hf_lookup_k}": {"prompt_lookup_num_tokens": args.hf_lookup_k}}
        for side, kw in hf_sides.items():
            if name == "edit" and "assisted" in side:
                continue
            gen = (lambda ids, kw=kw: hf["target"].generate(t_in(ids), max_new_tokens=n, min_new_tokens=n,
                                                            do_sample=False, **kw))
            check[side] = all(gen(ids)[0].tolist() == want[i] for i, ids in enumerate(prompts))
            sides[side] = gen
    totals, phases = time_sides(sides, prompts, args.reps, dev, decoders)
    ratio = speedups(totals, "plain")
    if hf is not None:
        hf_ratio = speedups(totals, "transformers generate")
    # Plain decode's seconds per token, its prompt processing (the "prefill" side: one token) taken out:
    # the cost model is about decode steps, and c, v below are measured against this.
    calls = args.reps * len(prompts)
    t_target = (sum(totals["plain"]) - sum(totals["prefill"])) / (calls * (n - 1))

    # alpha measured on its own: the draft's greedy guesses along the target's output
    matches = positions = 0
    for i, ids in enumerate(prompts):
        m, p = teacher_forced_alpha(target, draft, ids, want[i][len(ids):])
        matches, positions = matches + m, positions + p
    alpha_tf = matches / positions
    rows = {}
    for side, ts in totals.items():
        if side == "prefill":
            continue
        row: dict[str, Any] = {"seconds": statistics.median(ts), "seconds_per_rep": ts,
                               "tokens_per_s": len(prompts) * n / statistics.median(ts),
                               "speedup_over_plain": ratio[side], "equal_to_greedy": check.get(side)}
        if hf is not None and side.startswith("transformers"):
            row["speedup_over_transformers_generate"] = hf_ratio[side]
        dec = decoders.get(side)
        if dec is not None:
            k, ph = dec.k, phases[side]
            c = ph["draft_s"] / (ph["steps"] * k) / t_target
            v = ph["verify_s"] / ph["steps"] / t_target
            row.update(k=k, tokens_per_step=ph["tokens"] / ph["steps"], acceptance_rate=ph["kept"] / max(ph["offered"], 1),
                       alpha_from_run=ph["kept"] / max(ph["kept"] + ph["rejections"], 1), c=c, v=v,
                       decode_speedup=ph["tokens"] * t_target / (ph["draft_s"] + ph["verify_s"]))
            if side.startswith("draft") and dec.draft_confidence == 0:
                row["predicted_speedup"] = predicted_speedup(alpha_tf, k, c, v)
                row["predicted_speedup_v1"] = predicted_speedup(alpha_tf, k, c, 1.0)
                row["prediction_error"] = row["predicted_speedup"] / row["decode_speedup"] - 1
        rows[side] = row
        print(f"  {name:10s} {side:38s} {row['tokens_per_s']:8.1f} tok/s  x{ratio[side]:.2f}"
              + (f"  decode x{row['decode_speedup']:.2f} predicted x{row['predicted_speedup']:.2f}"
               if "predicted_speedup" in row else ""), flush=True)
    best_draft = max((s for s in rows if s.startswith("draft")), key=lambda s: rows[s]["speedup_over_plain"], default=None)
    best_ngram = max((s for s in rows if s.startswith("ngram")), key=lambda s: rows[s]["speedup_over_plain"], default=None)
    result = {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": n,
              "target_seconds_per_token": t_target, "prefill_seconds": statistics.median(totals["prefill"]) / len(prompts),
              "alpha_teacher_forced": alpha_tf, "checks": check, "best_draft": best_draft, "best_ngram": best_ngram,
              "rows": rows}
    if on_gpu:  # a diagnostic: the kernels of each phase, for the best draft k and the largest
        sides = {s: decoders[s] for s in dict.fromkeys([best_draft, f"draft k={max(args.draft_k)}"]) if s in decoders}
        try:
            result["phase_kernels"] = phase_kernels(baseline, sides, t_in(prompts[0]), n)
        except Exception as exc:  # its failure must not lose the figures above
            result["phase_kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return result


# --- the 1B projection (GPU) ---------------------------------------------------------------------------------

def projection_1b(alphas: dict[str, float], ks: list[int], new_tokens: int = 64) -> dict[str, Any]:
    """Time a 1B Llama-shaped target and a one-layer draft of its shape (random weights, bf16, CUDA graphs):
    target decode per token, and per k the draft and verify phases; apply the measured alphas."""
    from ..config import ModelConfig
    from ..model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(**LLAMA_1B)
    with torch.device("cuda"):
        target = Transformer(cfg).to(torch.bfloat16).eval()
        draft = Transformer(ModelConfig(**{**LLAMA_1B, "num_hidden_layers": 1})).to(torch.bfloat16).eval()
    for m in (target, draft):
        for p in m.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        m.fuse_projections(fused_gemv=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    base = CUDAGraphDecoder(target, 1, 32 + new_tokens)
    base.generate(ids, new_tokens)
    times = []
    for _ in range(5):
        B = base.prefill(ids)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        base.decode(B, new_tokens - 1)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (new_tokens - 1))
    t_target = statistics.median(times)
    out = {"target": {"params": cfg.num_parameters, **LLAMA_1B}, "draft": {"params": draft.config.num_parameters,
           "num_hidden_layers": 1}, "dtype": "bfloat16", "target_seconds_per_token": t_target, "rows": {}}
    for k in ks:
        dec = SpeculativeDecoder(target, draft, k)
        dec.generate(ids, new_tokens)  # capture
        cs, vs = [], []
        for _ in range(3):
            dec.generate(ids, new_tokens)
            s = dec.last_stats
            cs.append(s.draft_time_s / (s.steps * k) / t_target)
            vs.append(s.verify_time_s / s.steps / t_target)
        c, v = statistics.median(cs), statistics.median(vs)
        out["rows"][f"k={k}"] = {"k": k, "c": c, "v": v, **{f"projected_speedup_{w}": predicted_speedup(a, k, c, v)
                                                          for w, a in alphas.items()}}
        print(f"  1B projection k={k}: c {c:.3f} v {v:.3f} " + " ".join(
            f"{w} x{out['rows'][f'k={k}'][f'projected_speedup_{w}']:.2f}" for w in alphas), flush=True)
        del dec
    return out


# --- main ---------------------------------------------------------------------------------------------

def _hf_models(target_dir, draft_dir, device):
    from transformers import AutoModelForCausalLM

    out = {}
    for key, path in (("target", target_dir), ("draft", draft_dir)):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        m.generation_config.eos_token_id = None  # never stop early: both sides generate exactly n tokens
        m.generation_config.pad_token_id = 0
        out[key] = m
    return out


def _smoke_models(tmp: Path):
    """Random toy target and draft saved as HF folders (the same code path as the shipped pair)."""
    from ..config import ModelConfig
    from ..loading import save_pretrained
    from ..model import Transformer
    from ..tiny.tokenizer import copy_tokenizer_files

    torch.manual_seed(0)
    dirs = []
    for name, layers in (("target", 2), ("draft", 1)):
        m = Transformer(ModelConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=2, num_key_value_heads=1))
        dirs.append(save_pretrained(m, tmp / name))
        copy_tokenizer_files(ASSETS / "tokenizer", tmp / name)
    return dirs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="course/results", help="a folder: writes speculative_{cpu,gpu}.json")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--prompts", type=int, default=None, help="completion prompts (default: 4 on CPU, 8 on GPU)")
    ap.add_argument("--edit-prompts", type=int, default=None, help="edit prompts (default: 3 on CPU, 6 on GPU)")
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--draft-k", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], help="the cost model's sweep")
    ap.add_argument("--stop-k", type=int, nargs="+", default=[4, 8, 12],
                    help="CPU: the decoder's default, drafting stops when the draft is unsure")
    ap.add_argument("--ngram-k", type=int, nargs="+", default=[3, 5, 8])
    ap.add_argument("--hf-lookup-k", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--draft", default=None, help="a draft model folder (default: the shipped nexus-tiny-draft)")
    ap.add_argument("--smoke", action="store_true", help="random toy models, one short prompt each: seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    args.prompts = args.prompts or (8 if on_gpu else 4)
    args.edit_prompts = args.edit_prompts or (6 if on_gpu else 3)
    target_dir, draft_dir = ASSETS / "nexus-tiny", Path(args.draft) if args.draft else ASSETS / "nexus-tiny-draft"
    if args.smoke:
        import tempfile

        target_dir, draft_dir = _smoke_models(Path(tempfile.mkdtemp()))
        args.prompts, args.edit_prompts, args.prompt_len, args.new_tokens, args.reps = 1, 1, 24, 12, 1
        args.draft_k, args.stop_k, args.ngram_k = [2, 3], [3], [3]
    t_start = time.perf_counter()
    target, tok = load_model(target_dir, device=device, dtype=torch.float32)
    draft, _ = load_model(draft_dir, device=device, dtype=torch.float32, tokenizer=False)
    if on_gpu:  # what SpeculativeDecoder does to its models on a GPU, done first: plain decode runs the same kernels
        target.fuse_projections(fused_gemv=True)
        draft.fuse_projections(fused_gemv=True)
    hf = None if args.skip_hf else _hf_models(target_dir, draft_dir, device)
    results: dict[str, Any] = {"benchmark": "speculative", **environment(), "smoke": args.smoke,
                               "models": {"target": str(target_dir.name), "draft": str(args.draft or draft_dir.name),
                                          "draft_layers": draft.config.num_hidden_layers},
                               "greedy": True, "dtype": "float32", "graphs": on_gpu, "reps": args.reps}
    if not on_gpu:
        results["cpu_threads"] = args.threads
    sources = code_prompts(tok, max(args.prompts, args.edit_prompts), args.prompt_len)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    completion = [s["ids"] for s in sources[: args.prompts]]
    edit = [edit_prompt(target, s["ids"], args.new_tokens, sep) for s in sources[: args.edit_prompts]]
    results["prompt_sources"] = [s["source"] for s in sources]
    results["workloads"] = {}
    for name, prompts in (("completion", completion), ("edit", edit)):
        print(f"{name}: {len(prompts)} prompts x {args.new_tokens} new tokens", flush=True)
        results["workloads"][name] = run_workload(name, target, draft, prompts, args, hf)
    if on_gpu and not args.smoke:
        alphas = {w: r["alpha_teacher_forced"] for w, r in results["workloads"].items()}
        results["projection_1b"] = {"label": "projection: 1B target and one-layer draft timed with random weights; "
                                             "speed-up = E(alpha) / (k c + v) with the tiny pair's measured alpha",
                                    **projection_1b(alphas, args.draft_k)}
    results["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / f"speculative_{'gpu' if on_gpu else 'cpu'}.json"
    save_json(results, path)
    print(f"wrote {path} in {results['wall_s']:.0f}s")
    return results


if __name__ == "__main__":
    main()
