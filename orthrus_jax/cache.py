"""A static, preallocated KV cache shared by the AR and diffusion views."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from orthrus_jax.config import Qwen3Config


@flax.struct.dataclass
class KVCache:
    """k, v: [layers, batch, max_len, kv_heads, head_dim]; length: int32[batch] committed positions.

    Entries at positions >= length are stale: attention masks them and later writes overwrite them.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: Qwen3Config, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   length=jnp.zeros((batch,), jnp.int32))


def write_cache(cache: KVCache, new_k: jax.Array, new_v: jax.Array, first_layer: int = 0
                ) -> KVCache:
    """Write new_k/v [layers, batch, T, kv, hd] at each row's length, into layers first_layer..
    first_layer + layers - 1 (default all); length is left unchanged.

    The caller commits with `cache.replace(length=...)`. One scatter on the native layout, so XLA
    updates the buffer in place inside a while loop (a vmapped dynamic_update_slice over the
    batch axis made it copy the whole cache several times per step). Writes past max_len are
    dropped, never clamped onto valid entries.
    """
    b, t = new_k.shape[1], new_k.shape[2]
    rows = jnp.arange(b)[:, None]
    positions = cache.length[:, None] + jnp.arange(t)[None, :]
    layers = slice(first_layer, first_layer + new_k.shape[0])
    return cache.replace(
        k=cache.k.at[layers, rows, positions].set(new_k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[layers, rows, positions].set(new_v.astype(cache.v.dtype), mode="drop"))
