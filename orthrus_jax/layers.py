"""Pure building blocks of a Qwen3 layer: RMSNorm, RoPE, SwiGLU (attention: orthrus_jax.attention)."""
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
