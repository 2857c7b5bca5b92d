"""Speculative decoding (lesson 05): a cheap proposer, one target forward to verify, exact acceptance.

Modules: `rejection` (the acceptance rule), `ngram` (prompt lookup), `static` (the fixed-shape loop,
CUDA-graphed on a GPU), `batched` (the paged path an engine drives), `decoder` (`SpeculativeDecoder`).
"""

from .batched import BatchedSpeculator, DraftModelProposer
from .decoder import SpeculativeDecoder, SpeculativeStats
from .ngram import NGramSpeculator
from .rejection import accept_greedy, accept_sampled, residual, sample_from

__all__ = [
    "BatchedSpeculator",
    "DraftModelProposer",
    "NGramSpeculator",
    "SpeculativeDecoder",
    "SpeculativeStats",
    "accept_greedy",
    "accept_sampled",
    "residual",
    "sample_from",
]
