"""Reference solutions to the exercises of lesson 04 (`course/04_prefix_caching.ipynb`).

Each function has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson04` holds
the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove every
checker rejects them (and they are the lesson's "common pitfalls", written as code).
"""

from __future__ import annotations


def chain_keys(token_ids, block_size, hash_fn):
    """Keys of the full blocks: key_i = hash_fn(key_{i-1}, tuple(block i)), key_{-1} = None."""
    keys, key = [], None
    for i in range(len(token_ids) // block_size):
        key = hash_fn(key, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        keys.append(key)
    return keys


def match_blocks(index, token_ids, block_size, hash_fn):
    """Block ids of the longest cached prefix. `index` maps key -> entry (.block, .tokens, .parent: the
    entry of the block before it, or None). A hit needs the tokens and the parent to agree, not just the key."""
    blocks, key, parent = [], None, None
    for i in range(len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        key = hash_fn(key, tokens)
        entry = index.get(key)
        if entry is None or entry.tokens != tokens or entry.parent is not parent:
            break
        blocks.append(entry.block)
        parent = entry
    return blocks


def radix_insert(root, token_ids):
    """Insert a sequence into a radix tree of nodes {"key": [tokens], "children": {first token: node}}."""
    node, pos = root, 0
    while pos < len(token_ids):
        child = node["children"].get(token_ids[pos])
        if child is None:  # nothing shares the next token: one new leaf holds the rest
            node["children"][token_ids[pos]] = {"key": list(token_ids[pos:]), "children": {}}
            return
        key = child["key"]
        k = 0
        while k < len(key) and pos + k < len(token_ids) and key[k] == token_ids[pos + k]:
            k += 1
        if k < len(key) and pos + k < len(token_ids):  # leaves the edge mid-way: split it at k
            upper = {"key": key[:k], "children": {key[k]: child}}
            child["key"] = key[k:]
            node["children"][key[0]] = upper
            child = upper
        elif k < len(key):  # ends inside the edge: already held
            return
        node, pos = child, pos + k


# --- wrong answers the checkers must catch ----------------------------------------------------------------


def chain_keys_with_partial(token_ids, block_size, hash_fn):
    """Also keys the partly filled last block, which is still being written."""
    keys, key = [], None
    for i in range(-(-len(token_ids) // block_size)):
        key = hash_fn(key, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        keys.append(key)
    return keys


def chain_keys_unchained(token_ids, block_size, hash_fn):
    """Hashes each block alone: equal blocks after different prefixes get the same key."""
    return [hash_fn(None, tuple(token_ids[i * block_size:(i + 1) * block_size]))
            for i in range(len(token_ids) // block_size)]


def chain_keys_whole_prefix(token_ids, block_size, hash_fn):
    """Hashes the whole prefix for every block: O(i*b) per block and a different key format."""
    return [hash_fn(None, tuple(token_ids[:(i + 1) * block_size])) for i in range(len(token_ids) // block_size)]


def match_blocks_trusts_the_key(index, token_ids, block_size, hash_fn):
    """A key found counts as a hit: a collision serves another prefix's K/V."""
    blocks, key = [], None
    for i in range(len(token_ids) // block_size):
        key = hash_fn(key, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        if key not in index:
            break
        blocks.append(index[key].block)
    return blocks


def match_blocks_no_parent_check(index, token_ids, block_size, hash_fn):
    """Compares the block's tokens but not what came before it."""
    blocks, key = [], None
    for i in range(len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        key = hash_fn(key, tokens)
        entry = index.get(key)
        if entry is None or entry.tokens != tokens:
            break
        blocks.append(entry.block)
    return blocks


def match_blocks_unchained(index, token_ids, block_size, hash_fn):
    """Looks every block up by hash_fn(None, tokens), as if keys were not chained."""
    blocks, parent = [], None
    for i in range(len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        entry = index.get(hash_fn(None, tokens))
        if entry is None or entry.tokens != tokens or entry.parent is not parent:
            break
        blocks.append(entry.block)
        parent = entry
    return blocks


def radix_insert_no_split(root, token_ids):
    """Where the sequence leaves an edge mid-way, hangs the rest from the node *below* the edge, as if the
    whole edge had matched."""
    node, pos = root, 0
    while pos < len(token_ids):
        child = node["children"].get(token_ids[pos])
        if child is None:
            node["children"][token_ids[pos]] = {"key": list(token_ids[pos:]), "children": {}}
            return
        key = child["key"]
        k = 0
        while k < len(key) and pos + k < len(token_ids) and key[k] == token_ids[pos + k]:
            k += 1
        if k < len(key) and pos + k == len(token_ids):
            return
        node, pos = child, pos + k


def radix_insert_replaces(root, token_ids):
    """Where the sequence leaves an edge mid-way, replaces the edge by a new leaf: the old sequence is lost."""
    node, pos = root, 0
    while pos < len(token_ids):
        child = node["children"].get(token_ids[pos])
        key = child["key"] if child else []
        k = 0
        while k < len(key) and pos + k < len(token_ids) and key[k] == token_ids[pos + k]:
            k += 1
        if child is None or (k < len(key) and pos + k < len(token_ids)):
            node["children"][token_ids[pos]] = {"key": list(token_ids[pos:]), "children": {}}
            return
        if k < len(key):
            return
        node, pos = child, pos + k


def radix_insert_split_one_late(root, token_ids):
    """Splits one token after the divergence point."""
    node, pos = root, 0
    while pos < len(token_ids):
        child = node["children"].get(token_ids[pos])
        if child is None:
            node["children"][token_ids[pos]] = {"key": list(token_ids[pos:]), "children": {}}
            return
        key = child["key"]
        k = 0
        while k < len(key) and pos + k < len(token_ids) and key[k] == token_ids[pos + k]:
            k += 1
        if k < len(key) and pos + k < len(token_ids):
            k = min(k + 1, len(key) - 1) if len(key) > 1 else k
            upper = {"key": key[:k], "children": {key[k]: child}}
            child["key"] = key[k:]
            node["children"][key[0]] = upper
            node, pos = upper, pos + k
            if pos < len(token_ids):
                node["children"].setdefault(token_ids[pos], {"key": list(token_ids[pos:]), "children": {}})
            return
        elif k < len(key):
            return
        node, pos = child, pos + k


def radix_insert_empty_leaf(root, token_ids):
    """Adds a node for every insert, even when the sequence ends exactly where a node ends."""
    radix_insert(root, token_ids)
    node, pos = root, 0
    while pos < len(token_ids):
        child = node["children"].get(token_ids[pos])
        if child is None or token_ids[pos:pos + len(child["key"])] != child["key"]:
            return
        node, pos = child, pos + len(child["key"])
    node["children"].setdefault(-1, {"key": [], "children": {}})


MISTAKES = {
    "chain_keys": [chain_keys_with_partial, chain_keys_unchained, chain_keys_whole_prefix],
    "match_blocks": [match_blocks_trusts_the_key, match_blocks_no_parent_check, match_blocks_unchained],
    "radix_insert": [radix_insert_no_split, radix_insert_replaces, radix_insert_split_one_late,
                     radix_insert_empty_leaf],
}
