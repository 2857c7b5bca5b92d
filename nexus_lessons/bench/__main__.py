"""`python -m nexus_lessons.bench`: the technique comparison, or any benchmark script by name.

    python -m nexus_lessons.bench --model nexus-tiny --techniques all --output results/
    python -m nexus_lessons.bench decode_sweep --out course/results
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

SCRIPTS_SKIP = {"__main__", "common", "suite"}


def scripts() -> list[str]:
    """Benchmark scripts in this package: every module with a main()."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in SCRIPTS_SKIP)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in scripts():
        importlib.import_module(f"nexus_lessons.bench.{argv[0]}").main(argv[1:])
        return
    from .suite import TECHNIQUES, InferenceBenchmark

    ap = argparse.ArgumentParser(
        prog="python -m nexus_lessons.bench",
        description="Compare generation techniques on one model. Other benchmarks: "
        + ", ".join(scripts()) + " (python -m nexus_lessons.bench NAME --help).")
    ap.add_argument("--model", default="nexus-tiny", help="shipped name or local HF folder")
    ap.add_argument("--techniques", nargs="+", default=["baseline", "kv_cache"],
                    help=f"'all' or any of {sorted(TECHNIQUES)}")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--sequence-lengths", nargs="+", type=int, default=[64, 128, 256],
                    help="new tokens generated after the prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--output", default="results/", help="a folder (gets results.json/.png) or a path ending .json")
    args = ap.parse_args(argv)
    techniques = "all" if args.techniques == ["all"] else args.techniques
    bench = InferenceBenchmark(args.model, techniques, args.batch_sizes, args.sequence_lengths,
                               prompt_len=args.prompt_len, repeats=args.repeats, device=args.device)
    bench.run()
    out = Path(args.output)
    json_path = out if out.suffix == ".json" else out / "results.json"
    bench.save(json_path)
    bench.plot_comparison(json_path.with_suffix(".png"))
    print(f"{'technique':<18} {'batch':>5} {'new':>5} {'tokens/s':>10} {'speed-up':>9}")
    for r in bench.results:
        print(f"{r['technique']:<18} {r['batch_size']:>5} {r['new_tokens']:>5} {r['tokens_per_s']:>10.1f} "
              f"{r.get('speedup', float('nan')):>8.1f}x")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
