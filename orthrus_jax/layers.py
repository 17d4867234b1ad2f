"""Pure building blocks of a Qwen3 layer: RMSNorm, RoPE, SwiGLU, and the two-source attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm as in HF Qwen3: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin tables [..., head_dim] in fp32 for integer positions [...]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [..., T, heads, head_dim] by tables [..., T, head_dim] (rotate-half convention)."""
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def swiglu_mlp(h: Array, gate: Array, up: Array, down: Array) -> Array:
    """down(silu(h @ gate) * (h @ up)) with weights stored [in, out]."""
    return (jax.nn.silu(h @ gate) * (h @ up)) @ down


def two_source_attention(
    q: Array,
    prefix_k: Array,
    prefix_v: Array,
    prefix_visible: Array,
    block_k: Array,
    block_v: Array,
    block_visible: Array,
) -> Array:
    """Attention of block queries over a shared prefix and over their own block, one softmax.

    q: [B, N, T, H, hd]: N blocks of T queries per row.
    prefix_k/v: [B, S, KV, hd]: keys shared by every block of a row (the KV cache, or a
      training row's AR keys). prefix_visible: [B, N, S] bool, which prefix keys a block sees.
    block_k/v: [B, N, T, KV, hd]: the block's own keys. block_visible: [T, T] bool
      (causal for the AR view, all-true for the diffusion view), or any mask broadcastable to
      the scores [B, N, KV, G, T, T] (a draft tree: [B, 1, 1, 1, T, T], ancestors only).
    Returns [B, N, T, H, hd] in q's dtype. GQA: H = KV * G, query head h uses KV head h // G.
    """
    b, n, t, h, d = q.shape
    kv = prefix_k.shape[2]
    g = h // kv
    qg = q.reshape(b, n, t, kv, g, d) * jnp.asarray(d ** -0.5, q.dtype)
    s_prefix = jnp.einsum("bntkgd,bskd->bnkgts", qg, prefix_k, preferred_element_type=jnp.float32)
    s_block = jnp.einsum("bntkgd,bnskd->bnkgts", qg, block_k, preferred_element_type=jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    s_prefix = jnp.where(prefix_visible[:, :, None, None, None, :], s_prefix, neg)
    s_block = jnp.where(block_visible, s_block, neg)
    s_all = jnp.concatenate([s_prefix, s_block], axis=-1)
    probs = jax.nn.softmax(s_all, axis=-1).astype(q.dtype)
    p_prefix, p_block = probs[..., : prefix_k.shape[1]], probs[..., prefix_k.shape[1]:]
    out = jnp.einsum("bnkgts,bskd->bntkgd", p_prefix, prefix_v)
    out = out + jnp.einsum("bnkgts,bnskd->bntkgd", p_block, block_v)
    return out.reshape(b, n, t, h, d)
