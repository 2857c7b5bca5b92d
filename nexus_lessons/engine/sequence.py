"""One request's state as it moves through the engine: its tokens, how many the cache holds, its timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no KV blocks
    RUNNING = "running"  # holds KV blocks; scheduled every step the budget allows
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request: its prompt, the tokens generated so far and how far the KV cache has got.

    `token_ids` holds the prompt and every output token read back so far. With the engine's overlap of
    host and device, the step in flight may already have sampled `num_pending` more tokens (0 or 1)
    that only the device knows yet, so the sequence is `num_tokens` = len(token_ids) + num_pending long.
    `num_computed` counts the tokens whose K/V are in the cache or being written by a launched step;
    a step feeds tokens [num_computed, num_tokens) (a prefill chunk, or the one newest token).
    """

    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    priority: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    num_pending: int = 0
    num_computed: int = 0
    cache_seq: int | None = None  # its sequence id in the PagedKVCache while it holds blocks
    row: int | None = None  # its row in the runner's persistent tables while running
    pending_index: int = -1  # where its pending token sits in the last launched step's sampled tokens
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its first admission
    max_num_tokens: int = 0  # prompt + max_tokens, capped by the model's context (set when queued)
    stop_ids: frozenset[int] = frozenset()  # eos (unless ignore_eos) and the request's stop_token_ids
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_outputs(self) -> int:
        """Output tokens sampled so far, read back or still pending."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def ttft(self) -> float | None:
        """Time to first token (seconds from arrival)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (seconds); None below two tokens."""
        n = len(self.output_token_ids)
        if self.finish_time is None or self.first_token_time is None or n < 2:
            return None
        return (self.finish_time - self.first_token_time) / (n - 1)
