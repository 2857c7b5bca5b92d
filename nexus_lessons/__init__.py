"""nexus_lessons: the finished, importable version of every technique the course builds.

Data flow, in the order the lessons build it: model -> cache -> kernels -> decoders -> engine.
"""

from .batching import ContinuousBatcher, IterationLevelBatcher, StaticBatcher
from .config import ModelConfig
from .engine import LLM, LLMEngine, SamplingParams
from .generate import generate, left_pad
from .kv_cache import CacheFullError, DynamicKVCache, KVCache
from .loading import from_hf, load_model, save_pretrained
from .model import Transformer
from .paged import OutOfBlocksError, PagedKVCache
from .prefix import PrefixCache, RadixPrefixCache
from .quant import QuantizedKVCache
from .sampling import logits_to_probs, sample_next
from .speculative import NGramSpeculator, SpeculativeDecoder


def __getattr__(name: str):
    # The benchmark pulls in matplotlib; import it only when asked for.
    if name == "InferenceBenchmark":
        from .bench.suite import InferenceBenchmark

        return InferenceBenchmark
    raise AttributeError(f"module 'nexus_lessons' has no attribute {name!r}")


__all__ = [
    "CacheFullError",
    "ContinuousBatcher",
    "DynamicKVCache",
    "InferenceBenchmark",
    "IterationLevelBatcher",
    "KVCache",
    "LLM",
    "LLMEngine",
    "ModelConfig",
    "NGramSpeculator",
    "OutOfBlocksError",
    "PagedKVCache",
    "PrefixCache",
    "QuantizedKVCache",
    "RadixPrefixCache",
    "SamplingParams",
    "SpeculativeDecoder",
    "StaticBatcher",
    "Transformer",
    "from_hf",
    "generate",
    "left_pad",
    "load_model",
    "logits_to_probs",
    "sample_next",
    "save_pretrained",
]
