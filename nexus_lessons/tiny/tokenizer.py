"""A byte-level BPE tokenizer (GPT-2 style) trained on the corpus with Hugging Face `tokenizers`.

Byte-level means the base alphabet is the 256 bytes, so every string, in any script, with emoji,
tabs, CRLF and runs of spaces, encodes and decodes back exactly (no unknown token, no normalisation).
One special token, `<|endoftext|>`, is eos, bos and pad at once: it separates files in the training
stream. Nothing is added automatically when encoding (no bos), so `tokenizers` and transformers give
the same ids for the same text.

Saved in transformers' format (tokenizer.json, tokenizer_config.json, special_tokens_map.json) with
`tokenizer_class = "PreTrainedTokenizerFast"`, which transformers 4.x and 5.x both load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 2048
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would change the text (and break the round trip).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Train BPE on `texts` (in the order given: the result depends only on the texts and settings)."""
    if vocab_size < 257 or vocab_size > 65536:
        raise ValueError(f"vocab_size must be in [257, 65536] (256 bytes + eos, ids fit uint16), got {vocab_size}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
    return i


def to_transformers(tok: Tokenizer) -> Any:
    """The same tokenizer as a transformers `PreTrainedTokenizerFast` (what `load_model` returns)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # True would rewrite " ," to "," on decode
    )


def save_tokenizer(tok: Tokenizer, folder: str | Path) -> Path:
    """Write the transformers files; pinned so both transformers 4.x and 5.x read them the same way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_transformers(tok).save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("backend", None)  # transformers 5 only
    cfg.pop("added_tokens_decoder", None)  # derived from tokenizer.json on load
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes its own name, which 4.x lacks
    cfg.update(bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
               clean_up_tokenization_spaces=False, model_max_length=MODEL_MAX_LENGTH)
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def load_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; build it with `python -m nexus_lessons.tiny.prepare`")
    return Tokenizer.from_file(str(path))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy the saved tokenizer files byte for byte (every shipped model carries the same files)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        (dst / name).write_bytes((Path(src) / name).read_bytes())


def tokenizer_sha256(folder: str | Path) -> str:
    """Fingerprint of tokenizer.json: the tokenized corpus records it so a mismatch is caught."""
    return hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()
