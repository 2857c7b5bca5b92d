"""The request mixes where prefix caching pays, and the most any prefix cache could reuse in them.

* shared system prompt: every request starts with the same instructions;
* few-shot: the same worked examples before each question;
* multi-turn chat: turn k's prompt is the whole conversation so far plus a new user message;
* branching: many continuations of one context (parallel sampling, tree search, agents retrying).

`ideal_hit` is the bound every test and benchmark compares with: a cache that forgets nothing serves
the longest common prefix of the prompt with any sequence computed before (token granularity), or that
rounded down to whole blocks (hash-chained full blocks); never the prompt's last token, whose logits
must be computed. Token ids are random (no tokenizer needed), drawn from `vocab`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..generate import generate


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def ideal_hit(prompt: list[int], computed: list[list[int]], block_size: int | None = None) -> int:
    """Prompt tokens an unbounded cache serves: the longest prefix shared with a sequence computed before
    (`block_size` given: whole blocks only, the hash design), at most len(prompt) - 1."""
    best = max((common_prefix_len(prompt, c) for c in computed), default=0)
    best = min(best, len(prompt) - 1)
    return best - best % block_size if block_size else best


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def shared_system_prompt(num_requests: int, system_len: int, user_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`num_requests` prompts: one system prompt, then a different user message each."""
    rng = random.Random(seed)
    system = _tokens(rng, system_len, vocab)
    return [system + _tokens(rng, user_len, vocab) for _ in range(num_requests)]


def few_shot(num_requests: int, shots: int, shot_len: int, question_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The same `shots` examples before each of `num_requests` different questions."""
    rng = random.Random(seed)
    examples = [t for _ in range(shots) for t in _tokens(rng, shot_len, vocab)]
    return [examples + _tokens(rng, question_len, vocab) for _ in range(num_requests)]


def branching(context_len: int, branches: int, depth: int, branch_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """A tree of prompts: one context, `branches` continuations of it, each continued again, `depth` levels.
    Listed parents first, so every prompt's parent was seen before it."""
    rng = random.Random(seed)
    level = [_tokens(rng, context_len, vocab)]
    out = list(level)
    for _ in range(depth):
        level = [p + _tokens(rng, branch_len, vocab) for p in level for _ in range(branches)]
        out += level
    return out


@dataclass
class Turn:
    """One request of a workload: its prompt length, the tokens the cache served, and the bound."""

    conversation: int
    turn: int
    prompt_len: int
    hit: int
    ideal_radix: int
    ideal_hash: int


def run_prompts(model, cache, prompts: list[list[int]], max_new_tokens: int) -> list[Turn]:
    """Serve `prompts` one after another through `generate` with `cache`, recording each one's hit."""
    computed: list[list[int]] = []
    turns = []
    for i, prompt in enumerate(prompts):
        before = cache.prefix_hit_tokens
        out = generate(model, [prompt], max_new_tokens, cache=cache)[0].tolist()
        turns.append(Turn(i, 0, len(prompt), cache.prefix_hit_tokens - before, ideal_hit(prompt, computed),
                          ideal_hit(prompt, computed, cache.block_size)))
        computed.append(out[:-1])  # the last sampled token is never fed, so its K/V never exist
    return turns


def multi_turn_chat(model, cache, *, conversations: int, turns: int, system_len: int, user_len: int,
                    reply_len: int, vocab: int, seed: int = 0) -> tuple[list[Turn], list[list[int]]]:
    """Chats that share one system prompt, served turn by turn, round robin over the conversations.

    Turn k's prompt is the conversation so far (every earlier prompt and reply) plus a new user message.
    Returns each turn's record and each conversation's final token ids."""
    rng = random.Random(seed)
    system = _tokens(rng, system_len, vocab)
    history = [list(system) for _ in range(conversations)]
    computed: list[list[int]] = []
    records = []
    for t in range(turns):
        for c in range(conversations):
            prompt = history[c] + _tokens(rng, user_len, vocab)
            before = cache.prefix_hit_tokens
            out = generate(model, [prompt], reply_len, cache=cache)[0].tolist()
            records.append(Turn(c, t, len(prompt), cache.prefix_hit_tokens - before, ideal_hit(prompt, computed),
                                ideal_hit(prompt, computed, cache.block_size)))
            computed.append(out[:-1])
            history[c] = out
    return records, history


def hit_rate(records: list[Turn], field: str = "hit") -> float:
    """Served (or ideal, with field="ideal_radix" / "ideal_hash") prompt tokens over all prompt tokens."""
    return sum(getattr(r, field) for r in records) / sum(r.prompt_len for r in records)
