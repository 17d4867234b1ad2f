"""The parameter pytree: the one HF key table, shapes, random init, and the frozen/trainable split.

Layer weights are stacked over a leading layer axis and stored [in, out] (HF stores [out, in]).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from orthrus_jax.config import Qwen3Config

Params = dict[str, Any]

# name in our tree -> (HF name inside model.layers.N., transposed). One table, used both ways.
LAYER_KEYS: dict[str, tuple[str, bool]] = {
    "input_norm": ("input_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
    "q_proj_diff": ("self_attn.q_proj_diff.weight", True),
    "k_proj_diff": ("self_attn.k_proj_diff.weight", True),
    "v_proj_diff": ("self_attn.v_proj_diff.weight", True),
    "o_proj_diff": ("self_attn.o_proj_diff.weight", True),
    "q_norm_diff": ("self_attn.q_norm_diff.weight", False),
    "k_norm_diff": ("self_attn.k_norm_diff.weight", False),
}
TOP_KEYS: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
DIFF_KEYS: tuple[str, ...] = tuple(k for k in LAYER_KEYS if k.endswith("_diff"))
# Each diffusion twin is initialised from (and shaped like) this AR weight.
DIFF_SOURCE: dict[str, str] = {k: k[: -len("_diff")] for k in DIFF_KEYS}


def hf_layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{LAYER_KEYS[name][0]}"


def layer_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes ([in, out] for matrices), without the layer axis."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "input_norm": (d,), "post_attn_norm": (d,),
        "q_proj": (d, cfg.q_dim), "k_proj": (d, cfg.kv_dim), "v_proj": (d, cfg.kv_dim),
        "o_proj": (cfg.q_dim, d), "q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    shapes.update({k: shapes[DIFF_SOURCE[k]] for k in DIFF_KEYS})
    return shapes


def top_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    return shapes


def param_shapes(cfg: Qwen3Config, dtype: Any = jnp.bfloat16) -> Params:
    """The full tree as jax.ShapeDtypeStruct leaves."""
    tree: Params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in top_shapes(cfg).items()}
    tree["layers"] = {k: jax.ShapeDtypeStruct((cfg.num_layers, *s), dtype)
                      for k, s in layer_shapes(cfg).items()}
    return tree


def iter_leaves(params: Params) -> Iterator[tuple[str, Any]]:
    """(leaf name 'embed' or 'layers/q_proj', array) for a parameter tree, top level first."""
    for k, v in params.items():
        if k != "layers":
            yield k, v
    for k, v in params["layers"].items():
        yield f"layers/{k}", v


def assemble_leaves(leaves: Iterable[tuple[str, Any]]) -> Params:
    """Inverse of iter_leaves."""
    params: Params = {"layers": {}}
    for name, arr in leaves:
        if name.startswith("layers/"):
            params["layers"][name[len("layers/"):]] = arr
        else:
            params[name] = arr
    return params


def hf_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transposed else shape


def init_params(cfg: Qwen3Config, key: jax.Array, dtype: Any = jnp.float32,
                copy_diff: bool = False) -> Params:
    """Random weights (normal 0.02, norms near 1), for tests and shape runs at real sizes."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, sds), k in zip(leaves, keys):
        name = path[-1].key
        if "norm" in name:
            out.append((1.0 + 0.1 * jax.random.normal(k, sds.shape)).astype(dtype))
        else:
            out.append((0.02 * jax.random.normal(k, sds.shape)).astype(dtype))
    params = jax.tree_util.tree_unflatten(treedef, out)
    if copy_diff:
        params = copy_ar_to_diff(params)
    return params


def copy_ar_to_diff(params: Params) -> Params:
    """Warm start: every _diff twin becomes a copy of its AR counterpart."""
    layers = dict(params["layers"])
    for name in DIFF_KEYS:
        layers[name] = layers[DIFF_SOURCE[name]]
    return {**params, "layers": layers}


def split_params(params: Params) -> tuple[Params, Params]:
    """(frozen backbone, trainable tree); the trainable tree holds exactly the _diff twins."""
    layers = params["layers"]
    trainable = {"layers": {k: layers[k] for k in DIFF_KEYS}}
    backbone = {k: v for k, v in params.items() if k != "layers"}
    backbone["layers"] = {k: v for k, v in layers.items() if k not in DIFF_KEYS}
    return backbone, trainable


def merge_params(backbone: Params, trainable: Params) -> Params:
    """Inverse of split_params."""
    return {**backbone, "layers": {**backbone["layers"], **trainable["layers"]}}


def unstack_layers(params: Params) -> Params:
    """The same weights with "layers" as a tuple of per-layer dicts instead of [layers, ...]
    stacked arrays: the model then runs its layers as an unrolled Python loop instead of a scan.

    For decoding on a GPU: there XLA copies each scanned layer's large weights out of the
    stacked arrays before its matmuls (gpu-20261204-172005-hlo-excerpt.txt), so a memory-bound
    step reads them three times. The stacked arrays stay alive while the caller holds `params`:
    peak memory is about twice the layer weights until it drops them. Inference only: training,
    checkpoints and sharding rules use the stacked layout.
    """
    stacked = params["layers"]
    n = {v.shape[0] for v in stacked.values()}
    if len(n) != 1:
        raise ValueError(f"stacked layer leaves disagree on the layer count: {sorted(n)}")
    layers = tuple({name: arr[i] for name, arr in stacked.items()} for i in range(n.pop()))
    return {**params, "layers": layers}


def count_params(tree: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def param_counts(cfg: Qwen3Config) -> tuple[int, int]:
    """(frozen backbone, trainable _diff) parameter counts, from shapes alone."""
    backbone, trainable = split_params(param_shapes(cfg))
    return count_params(backbone), count_params(trainable)


def trainable_fraction(cfg: Qwen3Config) -> float:
    """Trainable / total parameters (15.6 % for Qwen3-8B)."""
    n_frozen, n_train = param_counts(cfg)
    return n_train / (n_frozen + n_train)


def param_summary(cfg: Qwen3Config) -> str:
    """One line: total, frozen backbone and trainable _diff parameter counts and the trainable
    share (from shapes alone; "15.6 %" for Qwen3-8B, the paper's "16 %")."""
    n_frozen, n_train = param_counts(cfg)
    total = n_frozen + n_train

    def fmt(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return (f"parameters: {fmt(total)} = frozen backbone {fmt(n_frozen)} + trainable _diff "
            f"{fmt(n_train)} ({100 * n_train / total:.1f} % trainable)")


def cast_params(params: Params, dtype: Any) -> Params:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
