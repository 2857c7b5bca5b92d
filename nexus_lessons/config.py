"""The model's hyper-parameters, under transformers' field names so an HF config maps onto it 1:1."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Fields a config.json must give: nothing sensible can default them.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has bias on q/k/v
    sliding_window: int | None = None  # Mistral; we refuse sequences longer than it
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}")
        for name in (*REQUIRED_FIELDS, "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default and llama3 are)")
            if kind == "default":
                self.rope_scaling = None

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2 + (hd * (h + 2 * kv) if self.attention_bias else 0)
        layer = attn + 3 * d * self.intermediate_size + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d

    # --- transformers interop -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any, source: str = "the model config") -> "ModelConfig":
        """Map a transformers config (v4 or v5) onto ours. `source` names it in errors (load() gives the file)."""
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        missing = [name for name in REQUIRED_FIELDS if d.get(name) is None]
        if missing:
            raise ValueError(f"{source} has no {', '.join(missing)}: a Llama / Qwen2 / Mistral config needs "
                             f"{', '.join(REQUIRED_FIELDS)}")
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}")
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d.get('hidden_act')!r} is not supported (silu is)")
        # transformers v5 keeps RoPE settings in rope_parameters; v4 in rope_theta / rope_scaling.
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        attention_bias = bool(d.get("attention_bias", False)) or model_type == "qwen2"
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            sliding_window=window,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers (v4 and v5) loads for this architecture."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        d = asdict(self)
        d.pop("extra")
        d.pop("rope_scaling")
        d["architectures"] = [arch[self.model_type]]
        d["hidden_act"] = "silu"
        d["initializer_range"] = 0.02
        d["torch_dtype"] = "float32"
        d["rope_scaling"] = self.rope_scaling
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        if self.model_type == "llama":
            d.pop("sliding_window")
            d["mlp_bias"] = False
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d["use_sliding_window"] = False
        d.update(self.extra)
        return d

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} holds a {type(d).__name__}, not a JSON object of config fields")
        return cls.from_hf(d, source=str(path))

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token costs: layers x (K and V) x kv heads x head_dim x bytes."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * bytes_per_element


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.x frequency smoothing: long wavelengths slowed by `factor`, short kept, a ramp between."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


# --- where and in what precision: given as torch objects or by name -----------------------------------
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch.dtype, also from its name: `load_model(dtype="bfloat16")` is how people write it."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(map(repr, DTYPE_NAMES))} or a torch.dtype")
    raise TypeError(f"dtype must be a floating torch.dtype or one of {', '.join(map(repr, DTYPE_NAMES))}; "
                    f"got {dtype!r}")


def as_device(device: torch.device | str | int | None) -> torch.device | None:
    """A torch.device that exists on this machine: asking for CUDA without a GPU fails here, by name,
    instead of deep inside torch when the first tensor moves."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
            raise ValueError(f"device {device!r} asked for, but no CUDA device is available{build}: use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
    return dev
