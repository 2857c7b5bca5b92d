"""One Llama-family decoder for the whole course (RMSNorm, RoPE, GQA, SwiGLU, optional QKV bias).

The model never changes between lessons. Its attention layer computes q, k, v and applies RoPE; then,
if it was given a cache, it hands (q, k, v) to `cache.attend(layer, q, k, v)`, and the cache decides
how to store K/V and how to attend over what it holds. Lessons add caches, not models.

Cache protocol (see `kv_cache.KVCache` for the contiguous one):
    positions = cache.begin_forward(input_ids, attention_mask)   # reserves room, returns RoPE positions [B, T]
    out = cache.attend(layer_idx, q, k, v)                      # q [B, Hq, T, D], k/v [B, Hkv, T, D]
A cache whose `fuses_rope` is true at that moment gets the projections before RoPE instead and applies
it itself, in the kernel that stores K/V (`cuda_graph.GraphKVCache(fused_rope=True)`):
    out = cache.attend_unrotated(layer_idx, q, k, v, cos, sin)  # q/k/v [B, T, H*D], cos/sin [B, T, D]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention_mask, sdpa
from .config import ModelConfig, llama3_inv_freq
from .kernels.norm import rms_norm, silu_and_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like transformers does, then cast back: bf16 variance is too coarse.
        return rms_norm(x, self.weight, self.eps)  # one Triton kernel on CUDA, the PyTorch ops elsewhere


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in float32 (positions up to 1e5 need it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if config.rope_scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Follow the model to its device but stay float32: bf16 frequencies garble long positions.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]. The non-interleaved (rotate-half) convention of HF Llama."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        object.__setattr__(self, "qkv_proj", None)  # set by Transformer.fuse_projections()

    def forward(self, x, cos, sin, cache=None, mask=None) -> torch.Tensor:
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, cos, sin, cache, mask))

    def attend(self, q, k, v, cos, sin, cache=None, mask=None) -> torch.Tensor:
        """Projected q/k/v [B, T, H*D] -> heads, RoPE, attention -> [B, T, Hq*D], ready for o_proj."""
        B, T, _ = q.shape
        if cache is not None and getattr(cache, "fuses_rope", False):  # the cache rotates as it stores
            out = cache.attend_unrotated(self.layer_idx, q, k, v, cos, sin)
            return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = sdpa(q, k, v, mask, causal=True)  # the baseline: attend over the whole sequence again
        else:
            out = cache.attend(self.layer_idx, q, k, v)
        return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        object.__setattr__(self, "gate_up_proj", None)  # set by Transformer.fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gemv = None  # kernels.gemv.fused_linear, set by fuse_projections(fused_gemv=True)

    def forward(self, x, cos, sin, cache=None, mask=None) -> torch.Tensor:
        if self.gemv is not None:
            return self._forward_gemv(x, cos, sin, cache, mask)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_gemv(self, x, cos, sin, cache, mask) -> torch.Tensor:
        """The same layer with its projections as fused GEMVs (one kernel each at batch 1, the unfused ops
        otherwise): norm -> qkv, o_proj + residual | norm -> gate_up, silu_and_mul -> down + residual."""
        attn, mlp, n1, n2, f = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm, self.gemv
        qkv = f(x, attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=n1.weight, eps=n1.eps)
        out = attn.attend(*qkv.split(attn.qkv_sizes, dim=-1), cos, sin, cache, mask)
        x = f(out, attn.o_proj.weight, residual=x)
        gate_up = f(x, mlp.gate_up_proj.weight, norm_weight=n2.weight, eps=n2.eps)
        return f(gate_up, mlp.down_proj.weight, silu_mul=True, residual=x)


class Transformer(nn.Module):
    """A Llama / Qwen2 / Mistral decoder. Parameter names match transformers' (minus the `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gemv = None  # kernels.gemv.fused_linear for the final norm + lm_head, set by fuse_projections

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.no_grad()
    def fuse_projections(self, fused_gemv: bool = False) -> "Transformer":
        """One matmul for q/k/v and one for gate/up per layer, as vLLM does.

        At batch 1 each projection is a matrix-vector product that lasts a few microseconds, so fewer,
        larger ones waste less time in launches and tails. The fused weight becomes the storage and the
        separate q/k/v (gate/up) weights become views into it: no extra memory, same state_dict.
        `fused_gemv` runs each layer as four matrix-vector kernels with the norms, the activation and
        the residual adds folded in (`kernels.gemv`; batch <= 4 rows, the unfused ops otherwise), and
        the final norm + lm_head as one more.
        """
        from .kernels import gemv

        if fused_gemv and self.device.type == "cuda":
            gemv.build()
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is None:  # already fused: only the GEMV setting changes
                parts = [attn.q_proj, attn.k_proj, attn.v_proj]
                # Plain attributes, not submodules: the state_dict keeps transformers' names.
                object.__setattr__(attn, "qkv_proj", _fuse_linears(parts))
                attn.qkv_sizes = [p.out_features for p in parts]
                object.__setattr__(mlp, "gate_up_proj", _fuse_linears([mlp.gate_proj, mlp.up_proj]))
            layer.gemv = gemv.fused_linear if fused_gemv else None
        self.gemv = gemv.fused_linear if fused_gemv else None
        return self

    def unfuse_projections(self) -> "Transformer":
        for layer in self.layers:
            object.__setattr__(layer.self_attn, "qkv_proj", None)
            object.__setattr__(layer.mlp, "gate_up_proj", None)
            layer.gemv = None
        self.gemv = None
        return self

    def _apply(self, fn, recurse=True):
        # Moving or casting breaks the views into the fused weights: fall back to separate projections.
        self.unfuse_projections()
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache=None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. Without a cache: the full causal forward over `input_ids`.

        With a cache: `input_ids` are the new tokens only; the cache supplies everything before them.
        `attention_mask` [B, T] marks real tokens (1) and left padding (0); it is the second positional
        argument, as in transformers' models, so `model(batch.input_ids, batch.attention_mask)` works.
        """
        x = self._residual_stream(input_ids, cache, attention_mask, position_ids)
        if self.gemv is not None:  # the final norm folded into the lm_head GEMV
            return self.gemv(x, self.lm_head.weight, norm_weight=self.norm.weight, eps=self.norm.eps)
        return self.lm_head(self.norm(x))

    def hidden_states(self, input_ids, attention_mask=None, *, cache=None, position_ids=None) -> torch.Tensor:
        """The final normalised hidden states [B, T, hidden] (what draft heads in later lessons read)."""
        return self.norm(self._residual_stream(input_ids, cache, attention_mask, position_ids))

    def _residual_stream(self, input_ids, cache, attention_mask, position_ids) -> torch.Tensor:
        """The last layer's output [B, T, hidden], before the final norm."""
        self._check_input(input_ids, attention_mask)
        B, T = input_ids.shape
        mask = None
        if cache is not None:
            self._check_cache(cache)
            positions = cache.begin_forward(input_ids, attention_mask)
        elif attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            mask = attention_mask_for_padding(valid)
        else:
            if position_ids is None and T > self.config.max_position_embeddings:  # a packed batch may exceed it
                raise ValueError(f"{T} tokens are past the model's max_position_embeddings "
                                 f"({self.config.max_position_embeddings})")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if position_ids is not None:
            positions = position_ids
        self._check_positions(positions)
        cos, sin = self.rotary(positions, self.dtype)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        return x

    def _check_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                     read_ids: bool | None = None) -> None:
        """What the host knows about the input, checked every forward; the ids' values too where reading
        them is free (`read_ids`, default: not on a GPU, where it would stall every decode step: there
        generate() reads them once per call)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D LongTensor [batch, seq], got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {self.device}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: give at least one token")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if read_ids is None:
            read_ids = input_ids.device.type != "cuda" and not torch.compiler.is_compiling()
        if read_ids:
            self._check_token_ids(input_ids)

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Every id must index the embedding table (reads the smallest and largest back to the host)."""
        lo, hi = (int(x) for x in torch.aminmax(input_ids))
        V = self.config.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary (0..{V - 1}): "
                             "were the ids made by another model's tokenizer?")

    def _check_cache(self, cache) -> None:
        """A cache built for another model's shape fails here, naming both, before it reserves anything."""
        c = self.config
        layers = getattr(cache, "num_layers", None)
        if layers is not None and layers < c.num_hidden_layers:
            raise ValueError(f"the cache is built for {layers} layers but the model has {c.num_hidden_layers}: "
                             f"build it with {type(cache).__name__}.for_model(model, ...)")
        for name, ours, what in (("num_heads", c.num_key_value_heads, "{} KV heads"), ("head_dim", c.head_dim, "head_dim {}")):
            theirs = getattr(cache, name, None)
            if theirs is not None and theirs != ours:
                raise ValueError(f"the cache is built for {what.format(theirs)} but the model has {what.format(ours)}: "
                                 f"build it with {type(cache).__name__}.for_model(model, ...)")

    def _check_positions(self, positions: torch.Tensor) -> None:
        """RoPE positions past max_position_embeddings (or Mistral's window). Reading the largest back is a
        host sync on a GPU, so there it is checked only for a window; generate() checks lengths up front."""
        w = self.config.sliding_window
        if torch.compiler.is_compiling() or (positions.device.type == "cuda" and w is None):
            return
        n = int(positions.max()) + 1  # the sequence reaches this many tokens
        limit = self.config.max_position_embeddings
        if n > limit:
            raise ValueError(f"the sequence reaches {n} tokens, past the model's max_position_embeddings ({limit})")
        if w is not None and n > w:
            raise NotImplementedError(f"sequence longer than the sliding window ({w} tokens) is not supported")


def _fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None)
    fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
    fused.weight.copy_(torch.cat([m.weight for m in linears]))
    if first.bias is not None:
        fused.bias.copy_(torch.cat([m.bias for m in linears]))
    offset = 0
    for m in linears:  # re-point the originals at slices of the fused storage
        rows = slice(offset, offset + m.out_features)
        m.weight = nn.Parameter(fused.weight[rows], requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            m.bias = nn.Parameter(fused.bias[rows], requires_grad=m.bias.requires_grad)
        offset += m.out_features
    return fused


def attention_mask_for_padding(valid: torch.Tensor) -> torch.Tensor:
    """The no-cache mask for left-padded batches: causal, padded keys hidden."""
    T = valid.shape[1]
    slots = torch.arange(T, device=valid.device).expand_as(valid)
    return attention_mask(slots, valid)
