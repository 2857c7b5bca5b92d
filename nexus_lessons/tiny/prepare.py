"""Build the corpus, train the tokenizer, tokenize both splits: the CPU half of the recipe.

    python -m nexus_lessons.tiny.prepare                      # defaults below
    python -m nexus_lessons.tiny.prepare --tokenizer-out DIR --tokens-out DIR

Writes the tokenizer (transformers format) to `nexus_lessons/assets/tokenizer/` (every shipped model
copies it) and `train.npy` / `heldout.npy` (flat uint16, eos between files) + `meta.json` to
`.carry/tiny_data/` (git-ignored; carried to the GPU machine for `nexus_lessons.tiny.train`).
Takes about half a minute on two CPU cores and is deterministic: the same Python source gives the
same bytes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from .corpus import build_splits, save_tokens, tokenize_documents
from .tokenizer import VOCAB_SIZE, eos_id, save_tokenizer, tokenizer_sha256, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
DEFAULT_TOKENS_DIR = REPO / ".carry" / "tiny_data"


def prepare(tokenizer_out: Path, tokens_out: Path, vocab_size: int = VOCAB_SIZE,
            max_files: int | None = None) -> dict:
    t0 = time.perf_counter()
    splits = build_splits(max_files=max_files)
    print(f"corpus: {splits.summary()}", flush=True)
    tok = train_tokenizer((d.text for d in splits.train), vocab_size=vocab_size)
    save_tokenizer(tok, tokenizer_out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {tokenizer_out}", flush=True)
    eos = eos_id(tok)
    train = tokenize_documents(tok, splits.train, eos)
    heldout = tokenize_documents(tok, splits.heldout, eos)
    meta = {
        **splits.summary(),
        "python": platform.python_version(),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_out),
        "heldout_paths": [d.path for d in splits.heldout],
        "command": " ".join([Path(sys.executable).name, "-m", "nexus_lessons.tiny.prepare", *sys.argv[1:]]),
    }
    save_tokens(tokens_out, train, heldout, meta)
    mib = (train.nbytes + heldout.nbytes) / 2**20
    print(f"tokens: train {train.size:,}, held-out {heldout.size:,} ({mib:.1f} MiB) -> {tokens_out} "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-out", type=Path, default=DEFAULT_TOKENIZER_DIR)
    p.add_argument("--tokens-out", type=Path, default=DEFAULT_TOKENS_DIR)
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    p.add_argument("--max-files", type=int, default=None, help="cap the corpus (quick experiments only)")
    a = p.parse_args(argv)
    prepare(a.tokenizer_out, a.tokens_out, a.vocab_size, a.max_files)


if __name__ == "__main__":
    main()
