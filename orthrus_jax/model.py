"""The functional Qwen3 stack with its two attention views over one shared set of keys.

AR view: causal over a prefix (the KV cache) and the new tokens, through q/k/v/o_proj.
Diffusion view: blocks [anchor, MASK x (K-1)] attend to a prefix and bidirectionally within
their own block, through the *_diff twins. Both views share norms, MLP, embeddings and head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from orthrus_jax.attention import attention
from orthrus_jax.cache import KVCache, write_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.layers import apply_rope, rms_norm, rope_tables, swiglu_mlp
from orthrus_jax.params import Params

Array = jax.Array
AR_VIEW = ""
DIFFUSION_VIEW = "_diff"
PREFILL_CHUNK = 512  # prompt tokens per prefill chunk: the default of every prefilling path


def _project(h: Array, w: Array, heads: int, head_dim: int) -> Array:
    """h [B, N, T, D] @ w, split into heads: [B, N, T, heads, head_dim]."""
    return (h @ w).reshape(*h.shape[:3], heads, head_dim)


def _keys_values(lp: Params, cfg: Qwen3Config, h: Array, cos: Array, sin: Array, view: str
                 ) -> tuple[Array, Array]:
    """A layer's K (normed, rotated) and V [B, N, T, KV, hd] from its normed input h."""
    k = _project(h, lp["k_proj" + view], cfg.num_kv_heads, cfg.head_dim)
    v = _project(h, lp["v_proj" + view], cfg.num_kv_heads, cfg.head_dim)
    return apply_rope(rms_norm(k, lp["k_norm" + view], cfg.rms_norm_eps), cos, sin), v


def _queries(lp: Params, cfg: Qwen3Config, h: Array, cos: Array, sin: Array, view: str) -> Array:
    """A layer's queries (normed, rotated) [B, N, T, H, hd] from its normed input h."""
    q = _project(h, lp["q_proj" + view], cfg.num_heads, cfg.head_dim)
    return apply_rope(rms_norm(q, lp["q_norm" + view], cfg.rms_norm_eps), cos, sin)


def _layer_output(lp: Params, cfg: Qwen3Config, x: Array, attn: Array, view: str) -> Array:
    """The rest of a layer after attention [B, N, T, H, hd]: o_proj into the residual, then the
    MLP."""
    x = x + attn.reshape(*x.shape[:3], cfg.q_dim) @ lp["o_proj" + view]
    h = rms_norm(x, lp["post_attn_norm"], cfg.rms_norm_eps)
    return x + swiglu_mlp(h, lp["gate_proj"], lp["up_proj"], lp["down_proj"])


def _layer_params(params: Params, i: int | Array) -> Params:
    """Layer i's weights from the stacked [layers, ...] tree or the per-layer tuple."""
    if isinstance(params["layers"], tuple):
        return params["layers"][i]
    return jax.tree_util.tree_map(
        lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), params["layers"])


def _layers(params: Params, cfg: Qwen3Config, x: Array, positions: Array,
            prefix_k: Array | None, prefix_v: Array | None, prefix_len: Array | None,
            causal: bool, view: str, remat: bool = False, block_mask: Array | None = None,
            inference: bool = False, n_layers: int | None = None
            ) -> tuple[Array, tuple[Array, Array]]:
    """Run the first n_layers (default all) on x [B, N, T, D]; returns (residual stream, their
    block K/V [n_layers, B, N, T, KV, hd]).

    prefix_k/v [layers, B, S, KV, hd] (or None: no prefix), prefix_len [B, N]: the prefix keys
    each block sees; causal / block_mask: the block part's mask (see orthrus_jax.attention).
    inference: attention loops over live key chunks only (cheapest; not reverse-differentiable).
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    n_layers = cfg.num_layers if n_layers is None else n_layers

    def layer(x, xs):
        lp, i = xs
        h = rms_norm(x, lp["input_norm"], cfg.rms_norm_eps)
        q = _queries(lp, cfg, h, cos, sin, view)
        k, v = _keys_values(lp, cfg, h, cos, sin, view)
        # the whole cache and the layer index: attention reads this layer's live key chunks
        # from it, with no per-layer copy of the cache
        attn = attention(q, k, v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_len=prefix_len,
                         causal=causal, block_mask=block_mask, dynamic_skip=inference,
                         layer=None if prefix_k is None else i)
        return _layer_output(lp, cfg, x, attn, view), (k, v)

    if remat:
        layer = jax.checkpoint(layer)
    if isinstance(params["layers"], tuple):   # per-layer weights (params.unstack_layers)
        kvs = []
        for i, lp in enumerate(params["layers"][:n_layers]):
            x, layer_kv = layer(x, (lp, jnp.asarray(i, jnp.int32)))
            kvs.append(layer_kv)
        kv = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *kvs)
    elif n_layers == cfg.num_layers:
        x, kv = jax.lax.scan(layer, x, (params["layers"], jnp.arange(cfg.num_layers)))
    else:  # a prefix of the stack: layer i's weights indexed per step, as the full scan
        # does (no copy of the first n_layers of the stack)
        x, kv = jax.lax.scan(lambda x, i: layer(x, (_layer_params(params, i), i)), x,
                             jnp.arange(n_layers))
    return x, kv


def _stack(params: Params, cfg: Qwen3Config, x: Array, positions: Array,
           prefix_k: Array | None, prefix_v: Array | None, prefix_len: Array | None,
           causal: bool, view: str, remat: bool = False, block_mask: Array | None = None,
           inference: bool = False) -> tuple[Array, tuple[Array, Array]]:
    """Run all layers on x [B, N, T, D] (see _layers); returns (final-normed hidden, per-layer
    block K/V)."""
    x, kv = _layers(params, cfg, x, positions, prefix_k, prefix_v, prefix_len, causal, view,
                    remat, block_mask, inference)
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
             remat: bool = False, inference: bool = True, visible: Array | None = None
             ) -> tuple[Array, Array, Array]:
    """AR view on tokens [B, T] over the committed cache [0, length); nothing is written.

    Token i sits at position length + offsets[:, i] (default i) and attends to the cache and to
    the block tokens j with block_mask[:, i, j] (default causal; [B, T, T] for a draft tree: its
    ancestors and itself). Returns (hidden [B, T, D], block K, block V [layers, B, T, kv, hd]).
    inference: cost follows the live context (not reverse-differentiable; False to differentiate).
    visible: int [B], the cache positions each row attends to (default cache.length); an idle
    row given 0 reads no cache, so it does not stretch the batch's key loop (its output is unused).
    """
    b, t = tokens.shape
    if offsets is None:
        offsets = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = cache.length[:, None] + offsets
    x = embed(params, tokens)[:, None]
    hidden, (new_k, new_v) = _stack(
        params, cfg, x, positions[:, None], cache.k, cache.v,
        (cache.length if visible is None else visible)[:, None], True,
        AR_VIEW, remat, block_mask=None if block_mask is None else block_mask[:, None],
        inference=inference)
    return hidden[:, 0], new_k[:, :, 0], new_v[:, :, 0]


def ar_forward(params: Params, cfg: Qwen3Config, tokens: Array, cache: KVCache,
               remat: bool = False, inference: bool = True, visible: Array | None = None
               ) -> tuple[Array, KVCache]:
    """AR view on tokens [B, T] at positions length..length+T-1 of each row.

    Attends causally to the committed cache [0, length) and the new tokens; writes their K/V at
    each row's length. Returns (hidden [B, T, D], cache with K/V written, length unchanged).
    inference: cost follows the live context (not reverse-differentiable; False to differentiate).
    visible: as in ar_block (the K/V are still written at each row's length).
    """
    hidden, new_k, new_v = ar_block(params, cfg, tokens, cache, remat=remat, inference=inference,
                                    visible=visible)
    return hidden, write_cache(cache, new_k, new_v)


def prefill_forward(params: Params, cfg: Qwen3Config, tokens: Array, cache: KVCache,
                    last: Array) -> tuple[Array, KVCache]:
    """AR prefill of tokens [B, T] at each row's length, for the one hidden state it needs.

    Writes every token's K/V into the cache (length unchanged), as ar_forward does, but runs
    the final layer's queries, attention, o_proj and MLP for one token per row only (last:
    int [B], an index into T, the prompt's last token): the other tokens' final-layer outputs
    feed nothing, only their K/V do. That token attends, through the same attention function,
    to the cache (which now holds the tokens before it) and to itself. Returns (final-normed
    hidden [B, D] of token `last`, the cache): ar_forward's hidden at `last`, with most of one
    layer's work in L saved (the final layer's K/V projections still run for every token).
    Requires cache.length + last < max_len (as every caller checks: the prompt fits the cache);
    a token past the cache's end would miss the keys whose writes were dropped.
    """
    b, t = tokens.shape
    n = cfg.num_layers
    positions = (cache.length[:, None] + jnp.arange(t, dtype=jnp.int32))[:, None]   # [B, 1, T]
    x = embed(params, tokens)[:, None]
    if n > 1:
        x, (k, v) = _layers(params, cfg, x, positions, cache.k, cache.v, cache.length[:, None],
                            True, AR_VIEW, inference=True, n_layers=n - 1)
        cache = write_cache(cache, k[:, :, 0], v[:, :, 0])
    lp = _layer_params(params, n - 1)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    h = rms_norm(x, lp["input_norm"], cfg.rms_norm_eps)
    k, v = _keys_values(lp, cfg, h, cos, sin, AR_VIEW)
    cache = write_cache(cache, k[None, :, 0], v[None, :, 0], first_layer=n - 1)

    def pick(a: Array) -> Array:  # token `last` of each row: [B, 1, T, ...] -> [B, 1, 1, ...]
        idx = last.astype(jnp.int32).reshape((b, 1, 1) + (1,) * (a.ndim - 3))
        return jnp.take_along_axis(a, idx, axis=2)

    q = _queries(lp, cfg, pick(h), pick(cos), pick(sin), AR_VIEW)
    attn = attention(q, pick(k), pick(v), prefix_k=cache.k, prefix_v=cache.v,
                     prefix_len=(cache.length + last.astype(jnp.int32))[:, None], causal=True,
                     dynamic_skip=True, layer=jnp.asarray(n - 1, jnp.int32))
    x = _layer_output(lp, cfg, pick(x), attn, AR_VIEW)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)[:, 0, 0], cache


def causal_forward(params: Params, cfg: Qwen3Config, tokens: Array, remat: bool = False
                   ) -> tuple[Array, Array, Array]:
    """AR view over whole rows tokens [B, L] at positions 0..L-1, with no cache (no scores
    against an empty prefix). Returns (hidden [B, L, D], k, v [layers, B, L, KV, hd])."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, 1, t))
    hidden, (k, v) = _stack(params, cfg, embed(params, tokens)[:, None], positions, None, None,
                            None, True, AR_VIEW, remat)
    return hidden[:, 0], k[:, :, 0], v[:, :, 0]


def chunked_prefill(params: Params, cfg: Qwen3Config, tokens: Array, prompt_lens: Array,
                    cache: KVCache, chunk: int) -> tuple[Array, KVCache]:
    """AR prefill of right-padded prompts tokens [B, P] in chunks of `chunk` tokens.

    Chunk i attends to the cache written by chunks < i (key chunks past it are skipped) and
    causally to itself, so temporaries grow with the chunk, not the prompt. The rows start at
    cache.length (the same for every row); chunks past the longest prompt are not run (their
    cache entries stay stale). Returns (hidden [B, D] at each row's last prompt token, the cache
    with length += prompt_lens). Writes past the cache's end are dropped.
    """
    b, p = tokens.shape
    chunk = max(1, min(chunk, p))
    n_chunks = -(-p // chunk)
    if n_chunks * chunk != p:
        tokens = jnp.pad(tokens, ((0, 0), (0, n_chunks * chunk - p)))
    start = cache.length
    last_idx = (prompt_lens - 1).astype(jnp.int32)

    def body(i, carry):
        cache, last = carry
        tok = jax.lax.dynamic_slice_in_dim(tokens, i * chunk, chunk, axis=1)
        rel = last_idx - i * chunk
        here = (rel >= 0) & (rel < chunk)
        hidden, cache = prefill_forward(params, cfg, tok, cache.replace(length=start + i * chunk),
                                        jnp.clip(rel, 0, chunk - 1))
        return cache, jnp.where(here[:, None], hidden, last)

    last = jnp.zeros((b, cfg.hidden_size), params["embed"].dtype)
    if n_chunks == 1:
        cache, last = body(0, (cache, last))
    else:  # chunks past every row's prompt (bucket padding) are skipped: a traced trip count
        n_live = jnp.clip((jnp.max(prompt_lens) + chunk - 1) // chunk, 1, n_chunks)
        cache, last = jax.lax.fori_loop(0, n_live.astype(jnp.int32), body, (cache, last))
    return last, cache.replace(length=(start + prompt_lens).astype(jnp.int32))


def diffusion_forward(params: Params, cfg: Qwen3Config, tokens: Array, positions: Array,
                      prefix_k: Array, prefix_v: Array, prefix_len: Array,
                      remat: bool = False, inference: bool = False) -> Array:
    """Diffusion view on N blocks per row, tokens and positions [B, N, K].

    Each block sees prefix keys at positions < prefix_len [B, N] (per block) and all keys of its
    own block; prefix_k/v [layers, B, S, kv, hd] are read, never written. Returns hidden [B, N, K, D].
    Inference form: N = 1, prefix = the KV cache, prefix_len = cache.length. Training form:
    prefix = the row's AR K/V, prefix_len = each block's anchor position (dual-pass mask).
    inference: cost follows the live context (not reverse-differentiable).
    """
    hidden, _ = _stack(params, cfg, embed(params, tokens), positions, prefix_k, prefix_v,
                       prefix_len, False, DIFFUSION_VIEW, remat, inference=inference)
    return hidden


def draft_block(params: Params, cfg: Qwen3Config, anchor: Array, cache: KVCache,
                block_size: int | None = None, visible: Array | None = None) -> Array:
    """Inference diffusion pass: [anchor, MASK x (K-1)] at each row's length; hidden [B, K, D].
    visible: as in ar_block."""
    k = block_size or cfg.block_size
    b = anchor.shape[0]
    tokens = jnp.concatenate([anchor[:, None], jnp.full((b, k - 1), cfg.mask_token_id, anchor.dtype)], 1)
    positions = cache.length[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    seen = cache.length if visible is None else visible
    hidden = diffusion_forward(params, cfg, tokens[:, None], positions[:, None], cache.k, cache.v,
                               seen[:, None], inference=True)
    return hidden[:, 0]
