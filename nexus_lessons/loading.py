"""Checkpoints in and out, in Hugging Face format: transformers is the format, not the runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, as_device, as_dtype
from .model import Transformer

ASSETS = Path(__file__).parent / "assets"
SHIPPED_MODELS = ("nexus-tiny", "nexus-tiny-draft")


def _hf_state_dict_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith("model."):
            name = name[len("model."):]
        if "rotary_emb" in name:
            continue
        out[name] = tensor
    return out


def _load_weights(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    state = _hf_state_dict_to_ours(state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model


def from_hf(hf_model: Any) -> Transformer:
    """Our `Transformer` with the weights of a transformers Llama / Qwen2 / Mistral model (same device and dtype)."""
    config = ModelConfig.from_hf(hf_model.config)
    p = next(hf_model.parameters())
    with torch.device(p.device):
        model = Transformer(config).to(p.dtype)
    return _load_weights(model, {k: v.detach() for k, v in hf_model.state_dict().items()}).eval()


Transformer.from_hf = staticmethod(from_hf)  # the public spelling: Transformer.from_hf(hf_model)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name or a local folder -> the folder that holds config.json."""
    if str(name_or_path) in SHIPPED_MODELS:
        path = ASSETS / str(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{name_or_path!r} is a shipped name but {path} has no config.json; "
                                    "reinstall the package, or rebuild it: python -m nexus_lessons.tiny.prepare, then python -m nexus_lessons.tiny.train (see assets/MODEL_CARD.md)")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: give one of {SHIPPED_MODELS} or a local folder with an HF "
        "checkpoint (config.json, *.safetensors, tokenizer files); nothing is downloaded"
    )


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    return state


def load_model(
    name_or_path: str | Path = "nexus-tiny",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: bool = True,
) -> tuple[Transformer, Any]:
    """(model, tokenizer) from a shipped name ("nexus-tiny", "nexus-tiny-draft") or a local HF folder.

    `dtype` is a torch.dtype or its name ("float32", the default, "bfloat16", "float16").
    """
    device, dtype = as_device(device), as_dtype(dtype) or torch.float32
    folder = resolve_model_path(name_or_path)
    config = ModelConfig.load(folder)
    tok = None
    if tokenizer:  # one larger than the vocabulary would fail only at its first id past it: refuse it now
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        if len(tok) > config.vocab_size:
            raise ValueError(
                f"the tokenizer in {folder} has {len(tok)} tokens but the model's vocab_size is "
                f"{config.vocab_size} ({folder / 'config.json'}): ids from {config.vocab_size} on have no "
                "embedding; use the tokenizer the weights were trained with"
            )
    state = _read_safetensors(folder)
    model = _load_weights(Transformer(config), state).to(device=device, dtype=dtype).eval()
    return model, tok


def save_pretrained(model: Transformer, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors that both `load_model` and transformers can read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v.detach().cpu().clone()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
