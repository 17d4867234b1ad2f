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


def write_cache(cache: KVCache, new_k: jax.Array, new_v: jax.Array) -> KVCache:
    """Write new_k/v [layers, batch, T, kv, hd] at each row's length; length is left unchanged.

    The caller commits with `cache.replace(length=...)`. Keep T slots of slack past the longest
    row: dynamic_update_slice clamps out-of-range starts, which would overwrite valid entries.
    """

    def write_row(buf, new, start):  # buf [L, S, kv, hd], new [L, T, kv, hd]
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0, 0))

    write = jax.vmap(write_row, in_axes=(1, 1, 0), out_axes=1)
    return cache.replace(k=write(cache.k, new_k, cache.length), v=write(cache.v, new_v, cache.length))
