"""The shipped model family, `nexus-tiny` and its draft, and the scripts that make it.

    python -m nexus_lessons.tiny.prepare    # CPU: corpus (stdlib source) -> tokenizer + token arrays
    python -m nexus_lessons.tiny.train      # GPU: train the target, distill the draft, evaluate
    python -m nexus_lessons.tiny.evaluate   # held-out loss, draft/target agreement, samples -> JSON

Modules: `corpus` (which files, the by-file split, tokenizing), `tokenizer` (byte-level BPE),
`recipe` (model shapes and the cost rule), `train`, `evaluate`, `prepare`.
"""

from .corpus import (
    CorpusSplits,
    Document,
    build_splits,
    is_heldout,
    load_tokens,
    save_tokens,
    tokenize_documents,
)
from .recipe import DRAFT_CONFIG, TARGET_CONFIG, cost_report, flops_per_token
from .tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, to_transformers, train_tokenizer

__all__ = [
    "DRAFT_CONFIG",
    "EOS_TOKEN",
    "TARGET_CONFIG",
    "CorpusSplits",
    "Document",
    "build_splits",
    "cost_report",
    "flops_per_token",
    "is_heldout",
    "load_tokenizer",
    "load_tokens",
    "save_tokenizer",
    "save_tokens",
    "to_transformers",
    "tokenize_documents",
    "train_tokenizer",
]
