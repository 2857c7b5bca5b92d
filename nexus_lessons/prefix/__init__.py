"""Prefix caching (lesson 04): reuse the K/V of a prompt's longest cached prefix.

Two designs over the same paged pool (lesson 02), chosen with `PagedKVCache(..., prefix_cache=...)`:

* `PrefixCache` ("hash"): vLLM's full blocks keyed by hash(parent key, block tokens);
* `RadixPrefixCache` ("radix"): SGLang's radix tree, matching at token granularity.

`visualize` (pictures and the stepping widget) and `workloads` (the lesson's request mixes) are
imported on demand.
"""

from .base import BasePrefixCache
from .hash_cache import PrefixCache, block_hash
from .radix_cache import RadixNode, RadixPrefixCache

__all__ = ["BasePrefixCache", "PrefixCache", "RadixNode", "RadixPrefixCache", "block_hash", "make_prefix_cache"]


def make_prefix_cache(spec) -> BasePrefixCache | None:
    """None, "hash", "radix", or a prefix cache object (returned as is)."""
    if spec is None or isinstance(spec, BasePrefixCache):
        return spec
    if spec == "hash":
        return PrefixCache()
    if spec == "radix":
        return RadixPrefixCache()
    raise ValueError(f"prefix_cache must be None, 'hash', 'radix' or a PrefixCache / RadixPrefixCache, got {spec!r}")
