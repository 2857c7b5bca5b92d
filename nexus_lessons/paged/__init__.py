"""Paged attention's memory side (lesson 02): block allocator, block tables with copy-on-write, and
`PagedKVCache`, which plugs into the model like `KVCache`; plus the lesson's fragmentation study and
block-pool pictures (`fragmentation`, `visualize`, imported on demand: they need numpy / matplotlib).
"""

from .block_allocator import BlockAllocator, OutOfBlocksError
from .block_table import BlockTables, Sequence
from .paged_cache import PagedKVCache, forward_sequences

__all__ = ["BlockAllocator", "BlockTables", "OutOfBlocksError", "PagedKVCache", "Sequence", "forward_sequences"]
