"""Put a finished training run in place: the shipped model folders, the results, the training log.

    python -m nexus_lessons.tiny.install DIR     # DIR: what `train --export` (or `--out`) wrote

Copies each model's config.json + model.safetensors into `nexus_lessons/assets/<name>/`, adds the
shipped tokenizer files (refusing a run whose corpus was tokenized by a different tokenizer), copies
tiny_models.json and train_log.json into `course/results/`, and loads both models once to check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..loading import ASSETS, SHIPPED_MODELS, load_model
from .evaluate import DEFAULT_RESULTS
from .tokenizer import copy_tokenizer_files, tokenizer_sha256


def install(src: str | Path, assets: Path = ASSETS, results_dir: Path = DEFAULT_RESULTS.parent) -> list[Path]:
    src = Path(src)
    tokenizer_dir = assets / "tokenizer"
    log_path = src / "train_log.json"
    if not log_path.exists():
        raise FileNotFoundError(f"{src} has no train_log.json: is it the folder `train --export` wrote?")
    train_log = json.loads(log_path.read_text())
    used = train_log.get("corpus", {}).get("tokenizer_sha256")
    if used is not None and used != tokenizer_sha256(tokenizer_dir):
        raise ValueError(f"the run used a corpus tokenized with tokenizer {used[:12]}..., but {tokenizer_dir} "
                         "holds a different one; ship the tokenizer the run was trained with")
    written = []
    for name in SHIPPED_MODELS:
        dst = assets / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            (dst / f).write_bytes((src / name / f).read_bytes())
        copy_tokenizer_files(tokenizer_dir, dst)
        load_model(dst)  # fails loudly on anything malformed
        written.append(dst)
    results_dir.mkdir(parents=True, exist_ok=True)
    for f, target in (("tiny_models.json", "tiny_models.json"), ("train_log.json", "tiny_train_log.json")):
        if (src / f).exists():
            (results_dir / target).write_bytes((src / f).read_bytes())
            written.append(results_dir / target)
    print(f"[tiny] installed: {[str(p) for p in written]}", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path)
    a = p.parse_args(argv)
    install(a.src)


if __name__ == "__main__":
    main()
