"""HF Qwen3 / Orthrus-Qwen3 safetensors <-> our parameter tree, through the one key table
(orthrus_jax.params TOP_KEYS / LAYER_KEYS).

Reading goes one tensor at a time (safetensors `framework="np"`, bf16 through ml_dtypes, no torch):
each stacked [layers, ...] leaf is allocated once, filled layer by layer in row chunks (unmapping
the file after each chunk), and handed on before the next leaf exists, so a consumer that writes
and drops each leaf needs about one leaf of memory. Writing streams one tensor at a time into
safetensors shards, leaf-major, so it too needs one leaf at a time.
Every HF key must be used and every leaf filled; anything else is a ConversionError that names
the file and the tensor.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from orthrus_jax.config import Qwen3Config, load_config
from orthrus_jax.params import (
    DIFF_KEYS, DIFF_SOURCE, LAYER_KEYS, TOP_KEYS, Params, assemble_leaves, iter_leaves,
    layer_shapes, top_shapes,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some old checkpoints carry; recomputed from the config, so skipped on purpose.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32, "fp16": np.float16}
AUTO_DTYPE = "auto"  # keep the checkpoint's dtype (that of its embedding table)
_ST_NAMES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16}
_ST_DTYPES = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32",
              np.dtype(np.float16): "F16"}


class ConversionError(ValueError):
    """A checkpoint this converter cannot read or write; the message names the file and tensor."""


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return np.dtype(DTYPES[dtype])
    return np.dtype(jnp.dtype(dtype))


class HFCheckpoint:
    """The tensors of one HF directory (single file or index + shards), opened lazily by name."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._handles: dict[str, Any] = {}
        self.key_file: dict[str, str] | None = None
        index = os.path.join(hf_dir, INDEX_FILE)
        single = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: not a valid safetensors index ({err!r})") from None
            self.key_file = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self._open(single)
            self.key_file = {k: single for k in self._handles[single].keys()}
        else:
            raise ConversionError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
        for path in sorted(set(self.key_file.values())):
            if not os.path.exists(path):
                raise ConversionError(f"{path}: shard named in {INDEX_FILE} is missing")

    def _open(self, path: str):
        if path not in self._handles:
            try:
                handle = safe_open(path, framework="np")
                keys = set(handle.keys())
            except Exception as err:  # the library raises its own error types for bad headers
                raise ConversionError(f"{path}: unreadable safetensors file ({err})") from None
            if self.key_file is not None:
                expected = {k for k, v in self.key_file.items() if v == path}
                if expected - keys:
                    raise ConversionError(f"{path}: lacks tensor {sorted(expected - keys)[0]} "
                                          f"listed in {INDEX_FILE}")
            self._handles[path] = handle
        return self._handles[path]

    def release(self) -> None:
        """Close the open files. safetensors memory-maps them, and every page read stays in this
        process's RSS until unmapped (reopening costs one header parse)."""
        self._handles.clear()

    def keys(self) -> set[str]:
        return set(self.key_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.key_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype of tensor key."""
        path = self.key_file[key]
        name = self._open(path).get_slice(key).get_dtype()
        if name not in _ST_NAMES:
            raise ConversionError(f"{path}: tensor {key} has dtype {name}; supported: "
                                  f"{', '.join(sorted(_ST_NAMES))}")
        return np.dtype(_ST_NAMES[name])

    def read_into(self, key: str, out: np.ndarray, transposed: bool, rows_per_chunk: int) -> None:
        """Fill out (our layout) from tensor key, row chunks at a time (casting if needed)."""
        path = self.key_file[key]
        try:
            shape = self.shape(key)
            want = tuple(reversed(out.shape)) if transposed else out.shape
            if shape != want:
                raise ConversionError(f"{path}: tensor {key} has shape {list(shape)}, the config "
                                      f"needs {list(want)}")
            n = shape[0] if shape else 1
            for r0 in range(0, n, rows_per_chunk):
                r1 = min(n, r0 + rows_per_chunk)
                sl = self._open(path).get_slice(key)
                chunk = sl[r0:r1] if shape else sl[...]
                del sl
                self.release()  # unmap: the pages just read would otherwise stay in our RSS
                if transposed:
                    out[:, r0:r1] = chunk.T
                elif shape:
                    out[r0:r1] = chunk
                else:
                    out[...] = chunk
        except ConversionError:
            raise
        except Exception as err:  # truncated data, unsupported dtype, ...
            raise ConversionError(f"{path}: cannot read tensor {key} ({err})") from None


def _plan(cfg: Qwen3Config, ckpt: HFCheckpoint) -> tuple[dict[str, list[tuple[str, bool]]], set[str]]:
    """Leaf name -> the HF (key, transposed) per layer (or one for top-level leaves); used keys."""
    plan: dict[str, list[tuple[str, bool]]] = {}
    for name, (hf_name, transposed) in TOP_KEYS.items():
        if name == "lm_head" and cfg.tie_word_embeddings:
            continue
        plan[name] = [(hf_name, transposed)]
    has_diff = {name: f"model.layers.0.{LAYER_KEYS[name][0]}" in ckpt for name in DIFF_KEYS}
    if any(has_diff.values()) and not all(has_diff.values()):
        missing = [LAYER_KEYS[n][0] for n, ok in has_diff.items() if not ok]
        raise ConversionError(f"{ckpt.hf_dir}: has some _diff twins but not model.layers.0.{missing[0]}")
    for name, (hf_name, transposed) in LAYER_KEYS.items():
        if name in DIFF_KEYS and not has_diff[name]:
            continue  # copied from the AR weight after reading
        plan["layers/" + name] = [(f"model.layers.{i}.{hf_name}", transposed)
                                  for i in range(cfg.num_layers)]
    used = {k for entries in plan.values() for k, _ in entries}
    for key in used:
        if key not in ckpt:
            raise ConversionError(f"{ckpt.hf_dir}: checkpoint lacks tensor {key}")
    allowed = used | ({TOP_KEYS["lm_head"][0]} if cfg.tie_word_embeddings else set())
    extra = sorted(k for k in ckpt.keys() - allowed if not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ConversionError(f"{ckpt.key_file[extra[0]]}: unexpected tensor {extra[0]} "
                              f"(not a Qwen3 / Orthrus weight for this config)")
    return plan, used


def iter_hf_leaves(hf_dir: str, dtype: Any = AUTO_DTYPE, progress: Callable[[int], None] | None = None,
                   chunk_bytes: int = 64 << 20, copy_diff: bool = False,
                   ) -> tuple[Qwen3Config, Iterator[tuple[str, np.ndarray]]]:
    """(config, iterator of (leaf path 'embed' or 'layers/q_proj', numpy leaf)).

    dtype: "auto" (the checkpoint's, read from its embedding table), a DTYPES name or a dtype;
    every leaf is cast to it.

    Leaves come one at a time so a caller can hand each on (to the device, to Orbax) before the
    next is allocated; the iterator drops its own reference before allocating the next leaf.
    _diff leaves absent from the checkpoint are not yielded, unless copy_diff: then each comes
    right after its AR leaf, as the same array (no copy). progress(n) is called after every n
    tensors read.
    """
    cfg = load_config(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    plan, _ = _plan(cfg, ckpt)
    np_dtype = ckpt.dtype(plan["embed"][0][0]) if dtype == AUTO_DTYPE else _np_dtype(dtype)
    shapes = {**top_shapes(cfg), **{"layers/" + k: (cfg.num_layers, *s)
                                    for k, s in layer_shapes(cfg).items()}}

    def leaves() -> Iterator[tuple[str, np.ndarray]]:
        for name, entries in plan.items():
            out = np.empty(shapes[name], np_dtype)
            slots = [out] if len(entries) == 1 and not name.startswith("layers/") else list(out)
            for slot, (key, transposed) in zip(slots, entries):
                row_bytes = max(1, int(np.prod(slot.shape[1:] if not transposed else slot.shape[:1]))
                                * np_dtype.itemsize)
                ckpt.read_into(key, slot, transposed, max(1, chunk_bytes // row_bytes))
                if progress:
                    progress(1)
            yield name, out
            if copy_diff and name.startswith("layers/"):
                for twin, source in DIFF_SOURCE.items():
                    if source == name[len("layers/"):] and "layers/" + twin not in plan:
                        yield "layers/" + twin, out
            del out, slots  # before the next leaf is allocated

    return cfg, leaves()


def count_hf_tensors(cfg: Qwen3Config, hf_dir: str) -> int:
    ckpt = HFCheckpoint(hf_dir)
    plan, used = _plan(cfg, ckpt)
    return len(used)


def assemble(cfg: Qwen3Config, leaves: Iterable[tuple[str, Any]]) -> Params:
    """Leaf stream -> full tree; missing _diff twins become the AR leaf (same array, no copy)."""
    params = assemble_leaves(leaves)
    for name in DIFF_KEYS:
        params["layers"].setdefault(name, params["layers"][DIFF_SOURCE[name]])
    return params


def read_hf_params(hf_dir: str, dtype: Any = jnp.float32) -> tuple[Qwen3Config, Params]:
    """(config, params as jax arrays) from an HF directory; missing _diff twins copy the AR weights."""
    cfg, leaves = iter_hf_leaves(str(hf_dir), dtype)
    params = assemble(cfg, ((name, jnp.asarray(arr)) for name, arr in leaves))
    return cfg, params


# ---------------------------------------------------------------------------------------------
# Writing HF safetensors, one tensor at a time.


def hf_tensor_plan(cfg: Qwen3Config, specs: dict[str, Any], get_leaf: Callable[[str], Any],
                   ) -> list[tuple[str, Callable[[], np.ndarray], tuple[int, ...], np.dtype]]:
    """(HF key, thunk giving the [out, in] numpy tensor, HF shape, dtype), leaf-major.

    specs maps leaf names ('embed', 'layers/q_proj', in the order given) to anything with .shape
    and .dtype; get_leaf(name) returns the leaf. All tensors of a leaf come together (every layer
    of q_proj, then k_proj, ...), so a writer that walks the list needs one leaf at a time.
    """
    hf_names = {**TOP_KEYS, **{f"layers/{k}": v for k, v in LAYER_KEYS.items()}}
    out = []
    for name, spec in specs.items():
        hf_name, transposed = hf_names[name]
        dtype = np.dtype(spec.dtype)
        stacked = name.startswith("layers/")
        shape = tuple(spec.shape[1:] if stacked else spec.shape)
        hf_shape = tuple(reversed(shape)) if transposed else shape

        def thunk(name=name, index=None, transposed=transposed) -> np.ndarray:
            leaf = get_leaf(name)
            arr = np.asarray(leaf[index] if index is not None else leaf)
            return np.ascontiguousarray(arr.T if transposed else arr)

        if stacked:
            for i in range(cfg.num_layers):
                out.append((f"model.layers.{i}.{hf_name}", functools.partial(thunk, index=i),
                            hf_shape, dtype))
        else:
            out.append((hf_name, thunk, hf_shape, dtype))
    return out


def hf_tensors(cfg: Qwen3Config, params: Params,
               ) -> list[tuple[str, Callable[[], np.ndarray], tuple[int, ...], np.dtype]]:
    """hf_tensor_plan for a whole in-memory tree."""
    leaves = dict(iter_leaves(params))
    return hf_tensor_plan(cfg, leaves, leaves.__getitem__)


def write_safetensors_streaming(path: str, tensors: list, metadata: dict[str, str] | None = None,
                                progress: Callable[[int], None] | None = None) -> None:
    """Write one safetensors file from (key, thunk, shape, dtype), materialising one at a time."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, _, shape, dtype in tensors:
        if dtype not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, thunk, shape, dtype in tensors:
            arr = thunk()
            assert arr.shape == tuple(shape) and arr.dtype == dtype, key
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if progress:
                progress(1)


def write_hf_safetensors(out_dir: str, cfg: Qwen3Config, params: Params | list,
                         max_shard_bytes: int = 5 << 30,
                         progress: Callable[[int], None] | None = None) -> list[str]:
    """Write params (a tree, or an hf_tensor_plan list) as HF safetensors (one file, or shards +
    index), tensors in list order. Returns the file names."""
    tensors = params if isinstance(params, list) else hf_tensors(cfg, params)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[2], dtype=np.int64)) * t[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    if len(shards) == 1:
        write_safetensors_streaming(os.path.join(out_dir, SINGLE_FILE), shards[0], progress=progress)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors_streaming(os.path.join(out_dir, name), shard, progress=progress)
        weight_map.update({t[0]: name for t in shard})
    total = sum(int(np.prod(t[2], dtype=np.int64)) * t[3].itemsize for t in tensors)
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX_FILE]


def tree_to_numpy(params: Params) -> Params:
    return jax.tree_util.tree_map(np.asarray, params)
