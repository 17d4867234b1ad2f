"""The model directory format shared by convert, train and infer.

MODEL_DIR/
  config.json            HF Qwen3 config in Orthrus form (block_size, mask_token_id)
  tokenizer.json, tokenizer_config.json, generation_config.json (copied when present)
  params/
    leaves.json          {"format": ..., "dtype": ..., "leaves": {leaf: {"dir", "shape"}}}
    embed/, final_norm/, [lm_head/], layers.q_proj/, ..., layers.k_norm_diff/
                         one Orbax (StandardCheckpointer) checkpoint per parameter leaf,
                         holding the tree {leaf dir name: array}

One Orbax item per leaf lets writers and readers stream: the converter reads a stacked leaf from
safetensors, saves it and frees it before reading the next, so peak memory is about one leaf
(plus Orbax's host copy of it), not the whole model; load_model restores (and casts) one leaf at
a time. Leaf names are paths in the parameter tree: "embed", "layers/q_proj".

Every writer builds the directory beside its target and renames it into place at the end, so
a failed or interrupted write leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from orthrus_jax import sharding as shd
from orthrus_jax.config import ConfigError, Qwen3Config, load_config
from orthrus_jax.hf import assemble, iter_hf_leaves, read_hf_params
from orthrus_jax.params import Params, assemble_leaves, iter_leaves, param_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")
PARAMS_SUBDIR = "params"
LEAF_INDEX = "leaves.json"
FORMAT = "orthrus-jax/orbax-per-leaf/1"


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory; rename it to out_dir only if the block succeeds."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output path already exists")
    parent = os.path.dirname(out_dir)
    created = parent  # the topmost parent this call creates, removed again on failure
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    made_parent = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like mkdir's
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            shutil.rmtree(created, ignore_errors=True)
        raise


def copy_model_files(src_dir: str, dst_dir: str) -> None:
    """Copy the tokenizer files and any remote-code modules (*.py, named by a config's auto_map,
    e.g. an Orthrus checkpoint's modeling file) from src_dir into dst_dir."""
    names = list(TOKENIZER_FILES)
    if os.path.isdir(src_dir):
        names += sorted(n for n in os.listdir(src_dir) if n.endswith(".py"))
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))  # not copy2: keep files writable


def read_source_config(src_dir: str) -> dict[str, Any]:
    """src_dir/config.json as a dict ({} when absent): the base whose extra fields are kept."""
    path = os.path.join(src_dir, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        hf = json.load(f)
    return hf if isinstance(hf, dict) else {}


def leaf_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Leaf name ('embed', 'layers/q_proj') -> shape, in the order leaves are written."""
    tree = param_shapes(cfg)
    out = {k: v.shape for k, v in tree.items() if k != "layers"}
    out.update({f"layers/{k}": v.shape for k, v in tree["layers"].items()})
    return out


def _leaf_dir(name: str) -> str:
    return name.replace("/", ".")


def release_freed_memory() -> None:
    """Hand memory freed by tensorstore's write/read buffers back to the OS (glibc malloc_trim).

    glibc keeps freed heap memory in its per-thread arenas; after each leaf that amounts to a
    few tenths of the leaf, and it piles up across leaves. A no-op where glibc is not the libc.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _leaf_writer() -> ocp.Checkpointer:
    """A synchronous PyTree checkpointer (the format StandardCheckpointer reads) whose numpy
    handler does not deep-copy (the default copies every host array before writing), local to
    this process: in a multi-host run one process writes host arrays alone, and Orbax's default
    barriers would wait for every process."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    me = jax.process_index()
    local = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(type_handler_registry=registry, multiprocessing_options=local),
        multiprocessing_options=local)


def write_model_dir_streaming(out_dir: str, cfg: Qwen3Config, leaves: Iterable[tuple[str, Any]],
                              tokenizer_dir: str, overwrite: bool = False) -> None:
    """Write a complete model directory atomically from a stream of (leaf name, array).

    tokenizer_dir (the HF source, or the model directory being re-exported) gives the tokenizer
    and remote-code files, and the config.json whose extra fields the new config keeps.

    Each leaf is saved (and Orbax's host copy released) before the next is drawn from the
    iterator, so a lazy iterator keeps at most one leaf alive. Every leaf of the config must come
    exactly once, with its shape and one common dtype. The same array may come under two names
    (a _diff twin aliasing its AR weight): it is written twice.
    """
    expected = leaf_shapes(cfg)
    with atomic_directory(out_dir, overwrite) as tmp:
        params_dir = os.path.join(tmp, PARAMS_SUBDIR)
        os.makedirs(params_dir)
        index: dict[str, Any] = {}
        dtype = None
        with _leaf_writer() as checkpointer:
            for name, arr in leaves:
                if name not in expected:
                    raise ValueError(f"unknown parameter leaf {name!r}")
                if name in index:
                    raise ValueError(f"parameter leaf {name!r} given twice")
                if tuple(arr.shape) != tuple(expected[name]):
                    raise ValueError(f"parameter leaf {name!r} has shape {list(arr.shape)}, the "
                                     f"config needs {list(expected[name])}")
                leaf_dtype = jnp.dtype(arr.dtype).name
                if dtype is None:
                    dtype = leaf_dtype
                elif leaf_dtype != dtype:
                    raise ValueError(f"parameter leaf {name!r} is {leaf_dtype}, others {dtype}")
                sub = _leaf_dir(name)
                checkpointer.save(os.path.join(params_dir, sub), args=ocp.args.PyTreeSave({sub: arr}))
                index[name] = {"dir": sub, "shape": list(arr.shape)}
                del arr  # before the iterator makes the next leaf
                release_freed_memory()
        scrub_commit_markers(params_dir)
        missing = [n for n in expected if n not in index]
        if missing:
            raise ValueError(f"parameter leaf {missing[0]!r} missing ({len(missing)} in all)")
        with open(os.path.join(params_dir, LEAF_INDEX), "w") as f:  # one line per leaf
            rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in index.items())
            f.write(f'{{"format": "{FORMAT}", "dtype": "{dtype}", "leaves": {{\n{rows}\n}}}}\n')
        hf = cfg.to_hf_dict(orthrus=True, dtype=dtype, base=read_source_config(tokenizer_dir))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        copy_model_files(tokenizer_dir, tmp)


def scrub_commit_markers(params_dir: str) -> None:
    """Orbax's commit_success.txt markers name the absolute (temporary) path they were written
    to; restate each relative to the model directory, so a model dir names no machine path."""
    for sub in sorted(os.listdir(params_dir)):
        marker = os.path.join(params_dir, sub, "commit_success.txt")
        if os.path.isfile(marker):
            with open(marker, "w") as f:
                f.write(f"Checkpoint commit was successful to {PARAMS_SUBDIR}/{sub}")


def write_model_dir(out_dir: str, cfg: Qwen3Config, params: Params, tokenizer_dir: str,
                    overwrite: bool = False) -> None:
    """Write a complete model directory atomically (leaf by leaf, see write_model_dir_streaming)."""
    write_model_dir_streaming(out_dir, cfg, iter_leaves(params), tokenizer_dir, overwrite)


def _params_path(model_dir: str) -> str:
    path = os.path.abspath(os.path.join(model_dir, PARAMS_SUBDIR))
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no Orbax parameter checkpoint (write one with python -m "
                          "convert.hf_to_orbax)")
    return path


def _read_index(path: str) -> dict[str, Any] | None:
    """The leaf index, or None for the older single-tree layout (params/ is one Orbax tree)."""
    index_path = os.path.join(path, LEAF_INDEX)
    if not os.path.exists(index_path):
        if os.path.exists(os.path.join(path, "_METADATA")):
            return None
        raise ConfigError(f"{path}: no {LEAF_INDEX} (incomplete model directory?)")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{index_path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else None
        raise ConfigError(f"{index_path}: unknown format {got!r}, want {FORMAT}")
    return index


def model_leaf_specs(model_dir: str) -> tuple[Qwen3Config, dict[str, jax.ShapeDtypeStruct]]:
    """(config, leaf name -> stored shape and dtype), without reading any array."""
    cfg = load_config(model_dir)
    path = _params_path(model_dir)
    index = _read_index(path)
    if index is None:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path)
        stored_tree = getattr(stored, "item_metadata", stored)
        dtype = jax.tree_util.tree_leaves(stored_tree)[0].dtype
    else:
        dtype = jnp.dtype(index["dtype"])
    return cfg, {k: jax.ShapeDtypeStruct(s, dtype) for k, s in leaf_shapes(cfg).items()}


def _default_device() -> jax.Device:
    """Where jax puts a new array in this process: jax_default_device (a device or a platform
    name) if set, else this process's first local device."""
    dev = jax.config.jax_default_device
    if isinstance(dev, str):
        return jax.local_devices(backend=dev)[0]
    return dev or jax.local_devices()[0]


def iter_model_leaves(model_dir: str, dtype: Any = None,
                      shardings: dict[str, Any] | None = None) -> Iterator[tuple[str, jax.Array]]:
    """(leaf name, array) one leaf at a time, in leaf_shapes order; dtype (None keeps the stored
    one) and shardings (leaf name -> jax.sharding.Sharding) are applied by Orbax at restore
    time: each leaf is read straight into its shards in the target dtype."""
    cfg, specs = model_leaf_specs(model_dir)
    path = _params_path(model_dir)
    index = _read_index(path)
    shardings = shardings or {}
    # a leaf with no sharding given goes to this process's default device: never to the device
    # recorded at save time (a CPU-written checkpoint names cpu:0, absent on a GPU machine)
    default = jax.sharding.SingleDeviceSharding(_default_device())
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    if index is None:  # older single-tree layout: restore the whole tree, then hand it out
        targets = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype,
                                              sharding=shardings.get(name, default))
                   for name, spec in specs.items()}
        with ocp.StandardCheckpointer() as checkpointer:
            stored = dict(iter_leaves(checkpointer.restore(path,
                                                           assemble_leaves(targets.items()))))
        for name in specs:
            yield name, cast(stored.pop(name))
        return
    with ocp.StandardCheckpointer() as checkpointer:
        for name, spec in specs.items():
            if name not in index["leaves"]:
                raise ConfigError(f"{path}/{LEAF_INDEX}: no parameter leaf {name!r}")
            sub = index["leaves"][name]["dir"]
            target = jax.ShapeDtypeStruct(spec.shape, spec.dtype if dtype is None else dtype,
                                          sharding=shardings.get(name, default))
            leaf_path = os.path.join(path, sub)
            try:
                arr = cast(checkpointer.restore(leaf_path, {sub: target})[sub])
            except Exception as err:  # missing, truncated or corrupt data (Orbax raises Exception)
                while err.__cause__ is not None:  # the storage layer's own reason
                    err = err.__cause__
                msg = " ".join(str(err).split())[:240]
                raise ConfigError(f"{leaf_path}: cannot restore parameter leaf {name!r} "
                                  f"({msg})") from None
            release_freed_memory()
            yield name, arr
            del arr


def load_model(model_dir: str, dtype: Any = None) -> tuple[Qwen3Config, Params]:
    """(config, params) from a model directory; dtype casts (None keeps the stored dtype).

    Leaves are restored and cast one at a time, so peak memory is the result plus one leaf.
    """
    cfg = load_config(model_dir)
    return cfg, assemble_leaves(iter_model_leaves(model_dir, dtype))


def load_any_model(model_dir: str, dtype: Any = jnp.float32, mesh: Any = None,
                   inference: bool = False) -> tuple[Qwen3Config, Params]:
    """(cfg, params) from an Orthrus model dir (params/) or an HF dir (model.safetensors), one
    leaf at a time, in dtype.

    With a mesh, every leaf goes straight into its sharding by orthrus_jax.sharding's rules (the
    inference rules, no fsdp, with inference=True): an Orthrus dir is restored into them by Orbax
    in the target dtype, an HF leaf is read on the host in the target dtype and each process
    places only its own shards; nothing is ever whole on one device, nor fp32 first. Missing
    _diff twins of an HF dir are copies of their AR weights."""
    if os.path.isdir(os.path.join(model_dir, PARAMS_SUBDIR)):
        if mesh is None:
            return load_model(model_dir, dtype)
        cfg, specs = model_leaf_specs(model_dir)
        shardings = dict(iter_leaves(_mesh_shardings(cfg, assemble_leaves(specs.items()), mesh,
                                                     inference)))
        return cfg, assemble_leaves(iter_model_leaves(model_dir, dtype, shardings))
    if mesh is None:
        return read_hf_params(model_dir, dtype)
    cfg, leaves = iter_hf_leaves(model_dir, dtype, copy_diff=True)
    shardings = dict(iter_leaves(_mesh_shardings(cfg, param_shapes(cfg), mesh, inference)))
    return cfg, assemble(cfg, ((name, shd.put_global(arr, shardings[name])) for name, arr in leaves))


def _mesh_shardings(cfg: Qwen3Config, tree: Any, mesh: Any, inference: bool) -> Any:
    if inference:
        return shd.inference_param_shardings(cfg, tree, mesh)
    return shd.param_shardings(tree, mesh)
