"""How one request wants its tokens chosen, and when it stops (vLLM's `SamplingParams`, the fields the course needs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real


@dataclass
class SamplingParams:
    """Per-request sampling and stopping.

    `temperature` 0 is greedy (argmax); otherwise the logits are divided by it, then cut to the `top_k`
    most likely tokens (-1: no cut) and to the smallest set holding `top_p` of the probability (1.0: no
    cut), and one token is drawn. `seed` makes a request's draws reproducible whatever else runs beside it
    (None: a fresh seed from torch's global generator). Generation stops after `max_tokens` new tokens, or
    at the model's end-of-sequence token (unless `ignore_eos`), or at any of `stop_token_ids`; a stop
    token is kept as the last output token, as in vLLM.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, Real) or not t >= 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (off) or an int >= 1, got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {ids!r}")
        self.temperature, self.top_p = float(t), float(self.top_p)
        self.stop_token_ids = [int(i) for i in ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)
