"""Device mesh and named sharding rules for parameters, optimizer state and batches.

One mesh over ("data", "fsdp", "tensor"); one frozen dataclass of shape-named PartitionSpecs.
Suffixes name the dimensions: l = layer, d = model dim, q/kv = attention projection width,
f = MLP width, v = vocab, b = batch rows, s = sequence. A mesh axis that does not divide its
dimension is dropped for that leaf (replicated), so tiny test configs run on any mesh.

Inference (generate, make_data, the server) uses the same rules without the fsdp axis
(`inference_rules`): attention projections split by whole heads over "tensor" (k/v only when the
KV heads divide the tensor size; otherwise they are replicated, as vLLM does), MLP and vocab over
"tensor", the KV cache over KV heads ("tensor") and rows ("data").
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from orthrus_jax.config import ConfigError, Qwen3Config

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    w_in_ldq: P = P(None, "fsdp", "tensor")     # q_proj(_diff), gate/up_proj: [layers, in, out]
    w_kv_ldk: P = P(None, "fsdp", "tensor")     # k/v_proj(_diff): [layers, in, kv heads * hd]
    w_out_lqd: P = P(None, "tensor", "fsdp")    # o_proj(_diff), down_proj: [layers, in, out]
    norm_ld: P = P(None, None)                  # per-layer norms
    embed_vd: P = P("tensor", "fsdp")
    head_dv: P = P("fsdp", "tensor")
    norm_d: P = P(None)
    batch_bs: P = P(BATCH_AXES, None)           # tokens / mask [rows, L]
    batch_ab: P = P(None, BATCH_AXES)           # leading grad-accumulation axis [accum, rows, ...]

    def param_spec(self, path: tuple[str, ...]) -> P:
        name = path[-1]
        if path[0] == "layers":
            if "norm" in name:
                return self.norm_ld
            if name.startswith(("o_proj", "down_proj")):
                return self.w_out_lqd
            if name.startswith(("k_proj", "v_proj")):
                return self.w_kv_ldk
            return self.w_in_ldq
        return {"embed": self.embed_vd, "lm_head": self.head_dv}.get(name, self.norm_d)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Any = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in fsdp takes all remaining devices.

    A mesh smaller than the device count uses the first data*fsdp*tensor devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp == -1:
        fsdp = n // (data * tensor)
    size = data * fsdp * tensor
    if size < 1 or size > n:
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} needs {size} devices, {n} available")
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)  # GSPMD propagation, not sharding-in-types
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=auto, devices=devices[:size])


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension (and pad the spec to the rank)."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % size == 0 else None)
    return P(*out)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(tree: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """NamedShardings for a parameter tree (full, backbone or trainable) by the named rules."""
    def one(path, leaf):
        return NamedSharding(mesh, fit_spec(rules.param_spec(_path_names(path)), leaf.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state: Any, params_like: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """Optimizer state: moments shard like their parameter (matched by path suffix); scalars replicate."""
    names = {_path_names(p)[-2:]: leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params_like)}

    def one(path, leaf):
        key = _path_names(path)
        shape = getattr(leaf, "shape", ())
        if len(key) >= 2 and key[-2:] in names and names[key[-2:]] == shape:
            pspec = rules.param_spec(("layers", key[-1]) if key[-2] == "layers" else key[-1:])
            return NamedSharding(mesh, fit_spec(pspec, shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, state)


def batch_shardings(batch: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """Batches [accum, rows, ...]: rows over (data, fsdp)."""
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fit_spec(rules.batch_ab, x.shape, mesh)), batch)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """Place a host batch [accum, rows, ...] (this process's rows; every process holds as many)
    as global arrays [accum, rows * processes, ...] sharded by the rules."""
    pc = jax.process_count()
    if pc == 1:
        return jax.device_put(batch, batch_shardings(batch, mesh, rules))
    global_shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0], x.shape[1] * pc, *x.shape[2:]), x.dtype), batch)
    return jax.tree_util.tree_map(
        lambda x, g, s: jax.make_array_from_process_local_data(s, x, g.shape),
        batch, global_shapes, batch_shardings(global_shapes, mesh, rules))


def maybe_initialize_distributed(enabled: bool) -> None:
    """jax.distributed.initialize() for multi-host runs, before anything touches the backend.

    The coordinator comes from the environment: JAX_COORDINATOR_ADDRESS (host:port of process
    0), JAX_NUM_PROCESSES and JAX_PROCESS_ID where set, else JAX's cluster auto-detection
    (SLURM, Open MPI, Cloud TPU, ...). A second call (already initialised) does nothing."""
    if not enabled or jax.distributed.is_initialized():
        return
    env = {name: os.environ.get(var) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                       ("process_id", "JAX_PROCESS_ID"))}
    jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v not in (None, "")})


# ---------------------------------------------------------------------------------------------
# Inference: tensor and data parallel over one (data, fsdp=1, tensor) mesh.


def inference_mesh(cfg: Qwen3Config, tensor: int = 1, data: int = 1, devices: Any = None) -> Mesh:
    """The mesh of --tensor-parallel-size / --data-parallel-size over every process's devices
    (the first data * tensor of them), after checking that the model's heads allow it."""
    devices = list(devices if devices is not None else jax.devices())
    if tensor < 1 or data < 1:
        raise ConfigError(f"--tensor-parallel-size {tensor} / --data-parallel-size {data}: "
                          "both must be >= 1")
    check_tensor_heads(cfg, tensor)
    if data * tensor > len(devices):
        raise ConfigError(f"--tensor-parallel-size {tensor} x --data-parallel-size {data} needs "
                          f"{data * tensor} devices, {len(devices)} available")
    return make_mesh(data, 1, tensor, devices)


def check_tensor_heads(cfg: Qwen3Config, tensor: int) -> None:
    """Query heads must divide the tensor size (whole heads per device), as vLLM requires."""
    if cfg.num_heads % tensor:
        raise ConfigError(f"--tensor-parallel-size {tensor}: total number of attention heads "
                          f"({cfg.num_heads}) must be divisible by tensor parallel size ({tensor})")


def kv_heads_split(cfg: Qwen3Config, mesh: Mesh) -> bool:
    """Whether KV heads are split over the tensor axis (else every device holds all of them)."""
    return cfg.num_kv_heads % mesh.shape["tensor"] == 0


def inference_rules(cfg: Qwen3Config, mesh: Mesh) -> ShardingRules:
    """The named rules without fsdp (weights are never gathered per step): heads, MLP and vocab
    over tensor; k/v projections by whole KV heads, or replicated when those do not divide."""
    kv = "tensor" if kv_heads_split(cfg, mesh) else None
    return ShardingRules(w_in_ldq=P(None, None, "tensor"), w_kv_ldk=P(None, None, kv),
                         w_out_lqd=P(None, "tensor", None), embed_vd=P("tensor", None),
                         head_dv=P(None, "tensor"))


def inference_param_shardings(cfg: Qwen3Config, tree: Any, mesh: Mesh) -> Any:
    """NamedShardings of a parameter tree (arrays or ShapeDtypeStructs) for inference."""
    return param_shardings(tree, mesh, inference_rules(cfg, mesh))


def place_params(cfg: Qwen3Config, params: Any, mesh: Mesh) -> Any:
    """In-memory params onto the inference mesh, leaf by leaf from the host (each process
    places only its own shards; multi-process callers must hold the same values)."""
    shardings = inference_param_shardings(cfg, params, mesh)
    return jax.tree_util.tree_map(lambda x, s: put_global(np.asarray(x), s), params, shardings)


def cache_specs(cfg: Qwen3Config, mesh: Mesh, batch: int) -> tuple[P, P]:
    """(spec of k/v [layers, rows, positions, kv heads, hd], spec of length [rows])."""
    rows = "data" if batch % mesh.shape["data"] == 0 else None
    kv = "tensor" if kv_heads_split(cfg, mesh) else None
    return P(None, rows, None, kv, None), P(rows)


def row_spec(mesh: Mesh, shape: tuple[int, ...]) -> P:
    """Rows (the leading dimension) over data, when they divide."""
    return fit_spec(P("data"), shape, mesh) if shape else P()


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array: each process places only
    its addressable shards, so nothing is ever whole on one device."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array in host memory."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
