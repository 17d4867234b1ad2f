"""The functional Qwen3 stack with its two attention views over one shared set of keys.

AR view: causal over a prefix (the KV cache) and the new tokens, through q/k/v/o_proj.
Diffusion view: blocks [anchor, MASK x (K-1)] attend to a prefix and bidirectionally within
their own block, through the *_diff twins. Both views share norms, MLP, embeddings and head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from orthrus_jax.cache import KVCache, write_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.layers import apply_rope, rms_norm, rope_tables, swiglu_mlp, two_source_attention
from orthrus_jax.params import Params

Array = jax.Array
AR_VIEW = ""
DIFFUSION_VIEW = "_diff"


def _stack(params: Params, cfg: Qwen3Config, x: Array, positions: Array, prefix_k: Array,
           prefix_v: Array, prefix_visible: Array, block_visible: Array, view: str,
           remat: bool = False) -> tuple[Array, tuple[Array, Array]]:
    """Run all layers on x [B, N, T, D]; returns (final-normed hidden, per-layer block K/V)."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    b, n, t, _ = x.shape

    def layer(x, xs):
        lp, pk, pv = xs
        h = rms_norm(x, lp["input_norm"], cfg.rms_norm_eps)
        q = (h @ lp["q_proj" + view]).reshape(b, n, t, cfg.num_heads, cfg.head_dim)
        k = (h @ lp["k_proj" + view]).reshape(b, n, t, cfg.num_kv_heads, cfg.head_dim)
        v = (h @ lp["v_proj" + view]).reshape(b, n, t, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(rms_norm(q, lp["q_norm" + view], cfg.rms_norm_eps), cos, sin)
        k = apply_rope(rms_norm(k, lp["k_norm" + view], cfg.rms_norm_eps), cos, sin)
        attn = two_source_attention(q, pk, pv, prefix_visible, k, v, block_visible)
        x = x + attn.reshape(b, n, t, cfg.q_dim) @ lp["o_proj" + view]
        h = rms_norm(x, lp["post_attn_norm"], cfg.rms_norm_eps)
        x = x + swiglu_mlp(h, lp["gate_proj"], lp["up_proj"], lp["down_proj"])
        return x, (k, v)

    if remat:
        layer = jax.checkpoint(layer)
    x, kv = jax.lax.scan(layer, x, (params["layers"], prefix_k, prefix_v))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), kv


def embed(params: Params, tokens: Array) -> Array:
    return jnp.take(params["embed"], tokens, axis=0)


def lm_logits(params: Params, hidden: Array) -> Array:
    """fp32 logits from final-normed hidden states (tied or untied head)."""
    if "lm_head" in params:
        return jnp.einsum("...d,dv->...v", hidden, params["lm_head"],
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...d,vd->...v", hidden, params["embed"], preferred_element_type=jnp.float32)


def ar_block(params: Params, cfg: Qwen3Config, tokens: Array, cache: KVCache,
             offsets: Array | None = None, block_mask: Array | None = None,
             remat: bool = False) -> tuple[Array, Array, Array]:
    """AR view on tokens [B, T] over the committed cache [0, length); nothing is written.

    Token i sits at position length + offsets[:, i] (default i) and attends to the cache and to
    the block tokens j with block_mask[:, i, j] (default causal; [B, T, T] for a draft tree: its
    ancestors and itself). Returns (hidden [B, T, D], block K, block V [layers, B, T, kv, hd]).
    """
    b, t = tokens.shape
    if offsets is None:
        offsets = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = cache.length[:, None] + offsets
    prefix_visible = jnp.arange(cache.max_len)[None, None, :] < cache.length[:, None, None]
    if block_mask is None:
        block_visible = jnp.tril(jnp.ones((t, t), dtype=bool))
    else:  # per row, broadcast over [B, N, kv, group, T, T] scores
        block_visible = block_mask[:, None, None, None]
    x = embed(params, tokens)[:, None]
    hidden, (new_k, new_v) = _stack(params, cfg, x, positions[:, None], cache.k, cache.v,
                                    prefix_visible, block_visible, AR_VIEW, remat)
    return hidden[:, 0], new_k[:, :, 0], new_v[:, :, 0]


def ar_forward(params: Params, cfg: Qwen3Config, tokens: Array, cache: KVCache,
               remat: bool = False) -> tuple[Array, KVCache]:
    """AR view on tokens [B, T] at positions length..length+T-1 of each row.

    Attends causally to the committed cache [0, length) and the new tokens; writes their K/V at
    each row's length. Returns (hidden [B, T, D], cache with K/V written, length unchanged).
    """
    hidden, new_k, new_v = ar_block(params, cfg, tokens, cache, remat=remat)
    return hidden, write_cache(cache, new_k, new_v)


def diffusion_forward(params: Params, cfg: Qwen3Config, tokens: Array, positions: Array,
                      prefix_k: Array, prefix_v: Array, prefix_len: Array,
                      remat: bool = False) -> Array:
    """Diffusion view on N blocks per row, tokens and positions [B, N, K].

    Each block sees prefix keys at positions < prefix_len [B, N] (per block) and all keys of its
    own block; prefix_k/v [layers, B, S, kv, hd] are read, never written. Returns hidden [B, N, K, D].
    Inference form: N = 1, prefix = the KV cache, prefix_len = cache.length. Training form:
    prefix = the row's AR K/V, prefix_len = each block's anchor position (dual-pass mask).
    """
    k = tokens.shape[-1]
    prefix_visible = jnp.arange(prefix_k.shape[2])[None, None, :] < prefix_len[:, :, None]
    full = jnp.ones((k, k), dtype=bool)
    hidden, _ = _stack(params, cfg, embed(params, tokens), positions, prefix_k, prefix_v,
                       prefix_visible, full, DIFFUSION_VIEW, remat)
    return hidden


def draft_block(params: Params, cfg: Qwen3Config, anchor: Array, cache: KVCache,
                block_size: int | None = None) -> Array:
    """Inference diffusion pass: [anchor, MASK x (K-1)] at each row's length; hidden [B, K, D]."""
    k = block_size or cfg.block_size
    b = anchor.shape[0]
    tokens = jnp.concatenate([anchor[:, None], jnp.full((b, k - 1), cfg.mask_token_id, anchor.dtype)], 1)
    positions = cache.length[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    hidden = diffusion_forward(params, cfg, tokens[:, None], positions[:, None], cache.k, cache.v,
                               cache.length[:, None])
    return hidden[:, 0]
