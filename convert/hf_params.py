"""Read HF Qwen3 / Orthrus-Qwen3 safetensors into our parameter tree through the one key table."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from orthrus_jax.config import Qwen3Config, load_config
from orthrus_jax.params import DIFF_KEYS, DIFF_SOURCE, LAYER_KEYS, TOP_KEYS, Params


def read_hf_params(hf_dir: str, dtype: Any = jnp.float32) -> tuple[Qwen3Config, Params]:
    """(config, params) from an HF directory; missing _diff twins are copied from the AR weights."""
    cfg = load_config(hf_dir)
    with safe_open(f"{hf_dir}/model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k).float().numpy() for k in f.keys()}

    def get(name: str, transposed: bool) -> np.ndarray:
        arr = tensors[name]
        return arr.T if transposed else arr

    params: Params = {}
    for name, (hf_name, transposed) in TOP_KEYS.items():
        if name == "lm_head" and cfg.tie_word_embeddings:
            continue
        params[name] = jnp.asarray(get(hf_name, transposed), dtype)
    layers = {}
    for name, (hf_name, transposed) in LAYER_KEYS.items():
        if name in DIFF_KEYS and f"model.layers.0.{hf_name}" not in tensors:
            hf_name, transposed = LAYER_KEYS[DIFF_SOURCE[name]]
        layers[name] = jnp.asarray(np.stack([get(f"model.layers.{i}.{hf_name}", transposed)
                                             for i in range(cfg.num_layers)]), dtype)
    params["layers"] = layers
    return cfg, params
