"""The serving engine (lesson 10): everything the course built, composed into one continuous-batching loop.

One file per concept, read in this order: `sampling_params` (what a request asks for), `sequence` (a
request's state), `scheduler` (who runs next, chunked prefill, preemption), `forward_batch` (the model's
view of the paged cache for one step), `model_runner` (metadata, CUDA graphs, launch without waiting),
`sampler` (every row's next token at once), `llm_engine` (the step loop, streaming), `llm` (generate).
"""

from .llm import LLM, RequestOutput
from .llm_engine import EngineConfig, LLMEngine, StepOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "StepOutput"]
