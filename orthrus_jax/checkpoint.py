"""The model directory format shared by convert, train and infer.

MODEL_DIR/
  config.json            HF Qwen3 config in Orthrus form (block_size, mask_token_id)
  tokenizer.json, tokenizer_config.json, generation_config.json (copied when present)
  params/                Orbax checkpoint of the full parameter tree (backbone + _diff twins)

Every writer builds the directory beside its target and renames it into place at the end, so
a failed or interrupted write leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from orthrus_jax.config import ConfigError, Qwen3Config, load_config
from orthrus_jax.params import Params, param_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")
PARAMS_SUBDIR = "params"


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


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> None:
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))  # not copy2: keep files writable


def write_model_dir(out_dir: str, cfg: Qwen3Config, params: Params, tokenizer_dir: str,
                    overwrite: bool = False, extra_config: dict[str, Any] | None = None) -> None:
    """Write a complete model directory atomically."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    with atomic_directory(out_dir, overwrite) as tmp:
        hf = cfg.to_hf_dict(orthrus=True, dtype=jnp.dtype(dtype).name)
        hf.update(extra_config or {})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        copy_tokenizer_files(tokenizer_dir, tmp)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS_SUBDIR), params)
            checkpointer.wait_until_finished()


def load_model(model_dir: str, dtype: Any = None) -> tuple[Qwen3Config, Params]:
    """(config, params) from a model directory; dtype casts (None keeps the stored dtype)."""
    cfg = load_config(model_dir)
    path = os.path.abspath(os.path.join(model_dir, PARAMS_SUBDIR))
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no Orbax parameter checkpoint (write one with python -m "
                          "convert.hf_to_orbax)")
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_dtype = jax.tree_util.tree_leaves(stored_tree)[0].dtype
        params = checkpointer.restore(path, param_shapes(cfg, stored_dtype))
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return cfg, params
