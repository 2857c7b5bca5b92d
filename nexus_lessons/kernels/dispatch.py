"""One public function per paged-attention op: check the arguments, then run Triton or the reference.

Which side runs (``impl``):

* ``"auto"`` (default): compiled Triton on CUDA tensors; on CPU the Triton interpreter when it is on
  (``TRITON_INTERPRET=1`` was set before ``triton`` was imported), else the PyTorch reference.
* ``"triton"``: the Triton kernel, or a clear error saying why it cannot run here.
* ``"reference"``: the plain-PyTorch twin from ``reference.py``.

The default comes from the environment variable ``NEXUS_KERNEL_IMPL`` and can be changed for the whole
process with ``set_default_impl``; every function also takes ``impl=`` for one call.

Checks come in two kinds. What the host already knows (shapes, dtypes, devices, the caller's bounds) is
checked on every call, at no cost to the GPU. Checks of values (``context_lens >= 1``, slots and block ids
in range) would read device memory back, a sync that costs more than a decode step, so they run only
when asked: ``validate=True`` for one call, or ``NEXUS_KERNEL_VALIDATE=1`` for the process (skipped during
CUDA-graph capture). A call with the defaults reads nothing back from the GPU.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Literal

import torch

from . import reference

Impl = Literal["auto", "triton", "reference"]
_IMPLS = ("auto", "triton", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)

_default_impl: str = os.environ.get("NEXUS_KERNEL_IMPL", "auto").strip().lower() or "auto"
_VALIDATE_ALWAYS = os.environ.get("NEXUS_KERNEL_VALIDATE", "0").strip().lower() in ("1", "true", "yes", "on")
if _default_impl not in _IMPLS:
    warnings.warn(f"NEXUS_KERNEL_IMPL={_default_impl!r} is not one of {_IMPLS}; using 'auto'", stacklevel=1)
    _default_impl = "auto"
_triton_module: SimpleNamespace | None = None
_triton_error: str | None = None


def set_default_impl(impl: Impl) -> None:
    """Choose the implementation every call uses unless it passes ``impl=``."""
    global _default_impl
    _check_impl(impl)
    _default_impl = impl


def get_default_impl() -> str:
    return _default_impl


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_kernels() -> SimpleNamespace | None:
    """The Triton launchers, imported on first use (so a notebook can still set ``TRITON_INTERPRET``
    first), or None when triton is missing. All kernel modules are imported together, so they are all
    compiled or all interpreted: ``write_kv_cache_triton``, ``paged_decode_attention_triton``,
    ``paged_prefill_attention_triton`` and ``interpreting``."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import common, decode, decode_streamk, extend, write  # noqa: F401 - decode: built here too

            _triton_module = SimpleNamespace(
                interpreting=common.interpreting,
                write_kv_cache_triton=write.write_kv_cache_triton,
                paged_decode_attention_triton=decode_streamk.paged_decode_attention_triton,
                paged_prefill_attention_triton=extend.paged_prefill_attention_triton,
            )
        except (ImportError, RuntimeError, OSError) as exc:  # no triton, or a broken install
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def interpreter_active() -> bool:
    """True when the Triton kernels run under the interpreter (built with TRITON_INTERPRET=1)."""
    mod = triton_kernels()
    return mod is not None and mod.interpreting()


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (see the module docstring)."""
    impl = _default_impl if impl is None else impl
    _check_impl(impl)
    if impl == "reference":
        return impl
    if device.type == "cuda":
        if triton_kernels() is not None:
            return "triton"
        if impl == "triton":
            raise RuntimeError(f"impl='triton' but triton cannot be imported ({_triton_error})")
        warnings.warn(f"triton unavailable ({_triton_error}); using the PyTorch reference", stacklevel=3)
        return "reference"
    # CPU (or another device): only the interpreter can run Triton code here.
    if impl == "auto" and not _env_interpret():
        return "reference"  # never import triton just to find out
    if interpreter_active():
        return "triton"
    if impl == "triton":
        why = _triton_error or (
            "the kernels were compiled for a GPU: TRITON_INTERPRET=1 must be set before triton is imported "
            "(export it in the shell, or set os.environ at the very top of the notebook and restart it)"
        )
        raise RuntimeError(f"impl='triton' on {device.type} tensors needs the Triton interpreter; {why}")
    return "reference"


@contextmanager
def _interpreter_env(device: torch.device) -> Iterator[None]:
    """Keep TRITON_INTERPRET=1 while interpreted kernels run.

    Triton reads the variable again at run time (e.g. when the interpreter lazily imports its helpers),
    so a process that built the kernels under the interpreter and then unset it would fail obscurely.
    """
    if device.type == "cuda" or _env_interpret():
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


# ------------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------------


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _want_values(validate: bool) -> bool:
    return (validate or _VALIDATE_ALWAYS) and not _capturing()


def _check_dim(name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_int(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be int32 (or int64), got {t.dtype}")


def _check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q/k_cache are on {device}: move them to one device")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check_dim("k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, D]")
    _check_dim("v_cache", v_cache, 4, "[num_blocks, block_size, Hkv, D]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"the KV cache must be float16, bfloat16 or float32, got {k_cache.dtype}")
    if k_cache.device != v_cache.device:
        raise ValueError(f"k_cache is on {k_cache.device} but v_cache is on {v_cache.device}")


def _check_attention_args(
    q: torch.Tensor,
    q_layout: str,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    batch: int | None,
) -> None:
    _check_dim("q", q, 3, q_layout)
    _check_cache(k_cache, v_cache)
    _check_dim("block_tables", block_tables, 2, "[B, max_blocks_per_seq]")
    _check_dim("context_lens", context_lens, 1, "[B]")
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}: they must match")
    _check_int("block_tables", block_tables)
    _check_int("context_lens", context_lens)
    _check_device(k_cache.device, q=q, block_tables=block_tables, context_lens=context_lens)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"q has head_dim {head_dim} but the cache has {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    b = context_lens.shape[0]
    if block_tables.shape[0] != b or (batch is not None and batch != b):
        raise ValueError(
            f"batch sizes disagree: context_lens [{b}], block_tables [{block_tables.shape[0]}, ...]"
            + ("" if batch is None else f", q [{batch}, ...]")
        )


def _check_new_kv(q: torch.Tensor, k_cache: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None) -> None:
    """k_new / v_new: both or neither, [total_q, Hkv, D], the cache's dtype, on its device."""
    if k_new is None and v_new is None:
        return
    if k_new is None or v_new is None:
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise ValueError(f"{given} was given without {missing}: pass the new tokens' keys and values together")
    layout = "[total_q, Hkv, D] (packed like q)"
    _check_dim("k_new", k_new, 3, layout)
    _check_dim("v_new", v_new, 3, layout)
    want = (q.shape[0], *k_cache.shape[2:])
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be [total_q, Hkv, D] = {list(want)}, got {list(t.shape)}")
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} is {t.dtype} but the KV cache is {k_cache.dtype}: they must match")
    _check_device(k_cache.device, k_new=k_new, v_new=v_new)


def _check_triton_head_dim(q: torch.Tensor) -> None:
    # A Triton limit, not attention's: the reference takes any head_dim.
    if q.shape[-1] < 16:
        raise ValueError(f"the Triton kernels need head_dim >= 16 (the smallest tl.dot tile), got {q.shape[-1]}; "
                         "use impl='reference'")


def _check_values(k_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    """Context lengths in [1, capacity] and every block id that will be read in [0, num_blocks)."""
    if context_lens.numel() == 0:
        return
    lens = context_lens.long()
    block_size = k_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    if bool((lens <= 0).any()):
        bad = int(torch.nonzero(lens <= 0)[0, 0])
        raise ValueError(f"context_lens[{bad}] = {int(lens[bad])}: every sequence needs >= 1 token")
    if bool((lens > capacity).any()):
        bad = int(torch.nonzero(lens > capacity)[0, 0])
        raise ValueError(
            f"context_lens[{bad}] = {int(lens[bad])} needs more than the {block_tables.shape[1]} blocks "
            f"x {block_size} tokens its block_tables row holds"
        )
    used = torch.arange(block_tables.shape[1], device=lens.device)[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    ids = block_tables[used]
    if bool(((ids < 0) | (ids >= k_cache.shape[0])).any()):
        raise ValueError(f"block_tables holds a block id outside [0, {k_cache.shape[0]}) in a used entry")


# ------------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------------


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: Impl | None = None,
    validate: bool = False,
) -> None:
    """Store new keys and values ``[N, Hkv, D]`` in place at ``slot_mapping [N]``.

    ``slot = block * block_size + offset``; -1 skips the row (padding). Both caches change in place.
    ``validate=True`` also checks every slot is in range (a read of ``slot_mapping`` back to the host).
    """
    _check_dim("k", k, 3, "[N, Hkv, D]")
    _check_dim("v", v, 3, "[N, Hkv, D]")
    _check_cache(k_cache, v_cache)
    _check_dim("slot_mapping", slot_mapping, 1, "[N]")
    _check_int("slot_mapping", slot_mapping)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k rows are [Hkv, D] = {tuple(k.shape[1:])} but the cache holds {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"k/v are {k.dtype}/{v.dtype} but the cache is {k_cache.dtype}: cast them first")
    _check_device(k_cache.device, k=k, v=v, slot_mapping=slot_mapping)
    if _want_values(validate) and slot_mapping.numel():
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is outside [-1, {num_slots})")
    device = k_cache.device
    if resolve_impl(impl, device) != "triton":
        reference.write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    elif device.type == "cuda":
        _triton_module.write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        with _interpreter_env(device):
            _triton_module.write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    impl: Impl | None = None,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    mean_context_len: float | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged context: ``q [B, Hq, D] -> [B, Hq, D]``.

    ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``; ``block_tables [B, max_blocks]`` and
    ``context_lens [B]`` int32 (the query is the last of the ``context_lens[b]`` tokens, already written).
    ``scale`` defaults to ``D ** -0.5``. The Triton launch is planned from what the host knows: the
    shapes and, when the caller has them, ``max_context_len`` (a bound on ``context_lens``; default: what
    the block table's width holds) and ``mean_context_len`` (with the max, it tells spread lengths, which
    the stream-K schedule balances). ``num_splits`` forces the split-KV count. ``validate=True`` also
    checks the lengths and block ids (a read back to the host: a sync on a GPU).
    """
    _check_attention_args(q, "[B, Hq, D]", k_cache, v_cache, block_tables, context_lens, q.shape[0])
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int (or None to choose), got {num_splits!r}")
    if max_context_len is not None and (not isinstance(max_context_len, int) or max_context_len < 1):
        raise ValueError(f"max_context_len must be a positive int (or None), got {max_context_len!r}")
    if _want_values(validate):
        _check_values(k_cache, block_tables, context_lens)
    device = q.device
    if resolve_impl(impl, device) != "triton":
        return reference.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    _check_triton_head_dim(q)
    launch = _triton_module.paged_decode_attention_triton
    if device.type == "cuda":
        return launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=num_splits,
                      max_context_len=max_context_len, mean_context_len=mean_context_len)  # fmt: skip
    with _interpreter_env(device):
        return launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=num_splits,
                      max_context_len=max_context_len, mean_context_len=mean_context_len)  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
    custom_mask: torch.Tensor | None = None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    impl: Impl | None = None,
    max_query_len: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Attention of many new tokens per sequence ("extend"/prefill), packed varlen: ``[total_q, Hq, D]``.

    Sequence b's queries are rows ``query_start_loc[b]:query_start_loc[b+1]`` (``query_start_loc [B+1]``
    cumulative, starting at 0, like flash-attn's ``cu_seqlens_q``). Their K/V are already in the cache, so
    they are the last ``q_len_b`` of the ``context_lens[b]`` tokens: a chunked-prefill chunk, a fresh
    prompt (``q_len == context_len``) or speculative candidates. They attend causally among themselves
    and to every cached token before them. ``custom_mask`` (bool ``[total_q, W]``, W >= the longest
    q_len) replaces the causal rule among the new tokens: row r sees new token j of its own sequence when
    ``custom_mask[r, j]`` (e.g. a draft tree; each token must see itself). ``max_query_len`` (a bound on
    every sequence's new tokens) sizes the launch; without it the host's bound (``total_q``, and what a
    block-table row holds) does, and the surplus programs exit at once. ``validate=True`` also checks
    ``query_start_loc``, the lengths, block ids and the mask's diagonal (a read back to the host).

    ``k_new, v_new [total_q, Hkv, D]`` (optional, together, packed like q): the new tokens' keys and
    values as contiguous rows, usually the tensors just written into their slots. Then only the cached
    prefix is gathered from the pages and the new part is read from these rows (on Hopper through TMA
    tensor descriptors). Without them every key comes from the cache.
    """
    _check_attention_args(q, "[total_q, Hq, D]", k_cache, v_cache, block_tables, context_lens, None)
    _check_dim("query_start_loc", query_start_loc, 1, "[B + 1]")
    _check_int("query_start_loc", query_start_loc)
    _check_device(k_cache.device, query_start_loc=query_start_loc)
    batch = context_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1:
        raise ValueError(f"query_start_loc must have B + 1 = {batch + 1} entries, got {query_start_loc.shape[0]}")
    if custom_mask is not None:
        _check_dim("custom_mask", custom_mask, 2, "[total_q, W] bool")
        if custom_mask.dtype != torch.bool:
            raise TypeError(f"custom_mask must be bool, got {custom_mask.dtype}")
        if custom_mask.shape[0] != q.shape[0]:
            raise ValueError(f"custom_mask has {custom_mask.shape[0]} rows for {q.shape[0]} query tokens")
        _check_device(k_cache.device, custom_mask=custom_mask)
    _check_new_kv(q, k_cache, k_new, v_new)
    if _want_values(validate):
        _check_values(k_cache, block_tables, context_lens)
        starts = query_start_loc.long()
        q_lens = starts[1:] - starts[:-1]
        if int(starts[0]) != 0 or int(starts[-1]) != q.shape[0] or bool((q_lens < 0).any()):
            raise ValueError(
                f"query_start_loc must rise from 0 to total_q = {q.shape[0]}, got {query_start_loc.tolist()}"
            )
        if bool((q_lens > context_lens.long()).any()):
            bad = int(torch.nonzero(q_lens > context_lens.long())[0, 0])
            raise ValueError(
                f"sequence {bad} has {int(q_lens[bad])} new tokens but context_lens[{bad}] = "
                f"{int(context_lens[bad])}: context_lens counts the new tokens too"
            )
        longest = int(q_lens.max()) if batch else 0
        if max_query_len is not None and max_query_len < longest:
            raise ValueError(f"max_query_len = {max_query_len} but a sequence has {longest} new tokens")
        if custom_mask is not None and q.shape[0]:
            if custom_mask.shape[1] < longest:
                raise ValueError(f"custom_mask has {custom_mask.shape[1]} columns; the longest q_len is {longest}")
            own = starts[:-1].repeat_interleave(q_lens)  # first row of each row's sequence
            diag = custom_mask[torch.arange(q.shape[0], device=q.device), torch.arange(q.shape[0], device=q.device) - own]
            if not bool(diag.all()):
                raise ValueError("custom_mask must let every new token see itself (its diagonal must be True)")
    if max_query_len is not None and (not isinstance(max_query_len, int) or max_query_len < 0):
        raise ValueError(f"max_query_len must be an int >= 0 (or None), got {max_query_len!r}")
    if resolve_impl(impl, q.device) != "triton":
        return reference.paged_prefill_attention_ref(
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, custom_mask,
            k_new=k_new, v_new=v_new,
        )  # fmt: skip
    _check_triton_head_dim(q)
    launch = _triton_module.paged_prefill_attention_triton
    args = (q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, custom_mask)
    if q.device.type == "cuda":
        return launch(*args, k_new=k_new, v_new=v_new, max_query_len=max_query_len)
    with _interpreter_env(q.device):
        return launch(*args, k_new=k_new, v_new=v_new, max_query_len=max_query_len)
