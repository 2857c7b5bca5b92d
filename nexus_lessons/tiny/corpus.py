"""The training text: the Python standard library's own source, present on every machine with Python.

What goes in, and why:
- every `*.py` file under `sysconfig.get_paths()["stdlib"]`, in sorted (posix) path order, read as
  UTF-8 bytes exactly as stored (no newline or whitespace normalisation: the tokenizer round-trips it);
- test suites are *included*: they are real, idiomatic Python and double the data an 8M model sees;
- left out as noise: installed packages (`site-packages`, `dist-packages`), `__pycache__`, the generated
  codec tables in `encodings/`, the one-string English docs in `pydoc_data/`, test *data* folders
  (`data`, `tokenizedata`, `typinganndata`, ...: Python 2 code, deliberately broken files), files that are
  not valid UTF-8, empty files, and files over `MAX_FILE_BYTES` (generated tables).

The held-out split is by file: a file is held out when a stable hash (SHA-256) of its relative posix
path falls in the lowest `HELDOUT_PER_10K` / 10000 of the hash range. It depends on nothing but the
path, so a file that exists in Python 3.11 and 3.12 lands in the same split on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

HELDOUT_PER_10K = 200  # 2% of files
MAX_FILE_BYTES = 512 * 1024
SKIP_ANYWHERE = frozenset({"site-packages", "dist-packages", "__pycache__"})
SKIP_TOP = frozenset({"encodings", "pydoc_data"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
TOKENS_DTYPE = np.uint16


@dataclass(frozen=True)
class Document:
    path: str  # relative posix path under the stdlib root
    text: str


@dataclass
class CorpusSplits:
    root: str
    train: list[Document]
    heldout: list[Document]

    def summary(self) -> dict[str, Any]:
        def chars(docs: Sequence[Document]) -> int:
            return sum(len(d.text) for d in docs)

        return {"root": self.root, "train_files": len(self.train), "heldout_files": len(self.heldout),
                "train_chars": chars(self.train), "heldout_chars": chars(self.heldout)}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _in_test_tree(dirs: Sequence[str]) -> bool:
    return any(d in TEST_DIRS or d.startswith("test_") for d in dirs)


def is_noisy_path(rel: str) -> bool:
    """True for paths the corpus leaves out by rule (see the module docstring)."""
    parts = PurePosixPath(rel).parts
    dirs = parts[:-1]
    if any(p in SKIP_ANYWHERE for p in parts) or (dirs and dirs[0] in SKIP_TOP):
        return True
    return _in_test_tree(dirs) and any(d == "data" or d.endswith("data") for d in dirs)


def is_heldout(rel: str) -> bool:
    """The split rule: a stable hash of the relative posix path, independent of the Python version."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
    return h % 10_000 < HELDOUT_PER_10K


def list_source_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the candidate `*.py` files, sorted; content filters are applied later."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    rels = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_ANYWHERE]  # prune site-packages early: it can be huge
        base = Path(folder).relative_to(root)
        rels += [(base / f).as_posix() for f in files if f.endswith(".py")]
    return sorted(r for r in rels if not is_noisy_path(r))


def read_source(path: Path) -> str | None:
    """The file's text, or None when it is left out by content (empty, too big, not UTF-8)."""
    data = path.read_bytes()
    if not data.strip() or len(data) > MAX_FILE_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build_splits(root: Path | None = None, max_files: int | None = None) -> CorpusSplits:
    """Train and held-out documents, each in sorted path order. `max_files` caps both (for toy runs)."""
    root = Path(root) if root is not None else stdlib_root()
    train: list[Document] = []
    heldout: list[Document] = []
    caps = (max_files, max(1, max_files // 10)) if max_files is not None else (None, None)
    for rel in list_source_files(root):
        split, cap = (heldout, caps[1]) if is_heldout(rel) else (train, caps[0])
        if cap is not None and len(split) >= cap:
            continue  # the split is decided by the path alone, so capped runs need not read the rest
        text = read_source(root / rel)
        if text is not None:
            split.append(Document(rel, text))
    if not train or not heldout:
        raise RuntimeError(f"the corpus under {root} is empty (train {len(train)}, held-out {len(heldout)} files)")
    return CorpusSplits(str(root), train, heldout)


def tokenize_documents(tokenizer: Any, docs: Iterable[Document], eos_id: int, batch_size: int = 256) -> np.ndarray:
    """One flat uint16 array: `eos doc eos doc ...` (eos separates files and starts the stream).

    `tokenizer` is a `tokenizers.Tokenizer`; its `encode_batch` runs on all cores and keeps order.
    """
    docs = list(docs)
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=TOKENS_DTYPE)
    for start in range(0, len(docs), batch_size):
        batch = docs[start:start + batch_size]
        for enc in tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids.size and int(ids.max()) > np.iinfo(TOKENS_DTYPE).max:
                raise ValueError("token id does not fit uint16: the vocabulary must stay below 65536")
            pieces += [eos, ids.astype(TOKENS_DTYPE)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=TOKENS_DTYPE)


# --- the pre-tokenized corpus on disk: train.npy, heldout.npy, meta.json ---------------------------

def save_tokens(folder: str | Path, train: np.ndarray, heldout: np.ndarray, meta: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", train.astype(TOKENS_DTYPE, copy=False))
    np.save(folder / "heldout.npy", heldout.astype(TOKENS_DTYPE, copy=False))
    meta = {**meta, "train_tokens": int(train.size), "heldout_tokens": int(heldout.size), "dtype": "uint16"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_tokens(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train, heldout, meta) written by `save_tokens`; a clear error when the folder is not one."""
    folder = Path(folder)
    missing = [n for n in ("train.npy", "heldout.npy", "meta.json") if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a tokenized corpus (missing {missing}); build it with "
                                "`python -m nexus_lessons.tiny.prepare`")
    train = np.load(folder / "train.npy")
    heldout = np.load(folder / "heldout.npy")
    if train.dtype != TOKENS_DTYPE or heldout.dtype != TOKENS_DTYPE:
        raise ValueError(f"token arrays in {folder} must be uint16, got {train.dtype} / {heldout.dtype}")
    return train, heldout, json.loads((folder / "meta.json").read_text())
