"""orthrus-jax: a functional JAX Qwen3 with the Orthrus dual (AR + diffusion) attention view."""
from orthrus_jax.cache import KVCache, init_cache, write_cache
from orthrus_jax.config import ConfigError, Qwen3Config, load_config
from orthrus_jax.model import ar_forward, diffusion_forward, draft_block, lm_logits
from orthrus_jax.params import (
    cast_params, copy_ar_to_diff, init_params, merge_params, param_shapes, param_summary,
    split_params, trainable_fraction,
)

__all__ = [
    "KVCache", "init_cache", "write_cache", "ConfigError", "Qwen3Config", "load_config",
    "ar_forward", "diffusion_forward", "draft_block", "lm_logits", "cast_params",
    "copy_ar_to_diff", "init_params", "merge_params", "param_shapes", "param_summary",
    "split_params", "trainable_fraction",
]
