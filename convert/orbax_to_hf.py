"""An orthrus-jax model directory -> the HF Orthrus format (safetensors, OrthrusLM config).

    python -m convert.orbax_to_hf --model DIR --out DIR

The output holds every backbone tensor plus model.layers.N.self_attn.{q,k,v,o}_proj_diff.weight
and {q,k}_norm_diff.weight, in the stored dtype (bf16 stays bf16); tied embeddings write no
lm_head. config.json has architectures ["OrthrusLM"], block_size and mask_token_id, so trained
heads load in the official PyTorch code. Leaves are restored one at a time and their tensors
written leaf-major (every layer's q_proj, then k_proj, ...), so peak memory is about one leaf.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from convert.errors import run_cli
from convert.hf_params import hf_tensor_plan, write_hf_safetensors
from orthrus_jax.checkpoint import (
    atomic_directory, copy_tokenizer_files, iter_model_leaves, model_leaf_specs,
)


def convert_orbax_to_hf(model_dir: str, out_dir: str, overwrite: bool = False,
                        max_shard_gb: float = 5.0, progress: bool = True) -> None:
    """Write MODEL_DIR's parameters and config as an HF Orthrus directory OUT_DIR (atomically)."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output path already exists")
    cfg, specs = model_leaf_specs(model_dir)
    dtype = jnp.dtype(next(iter(specs.values())).dtype).name
    current: dict[str, np.ndarray] = {}
    leaves = iter_model_leaves(model_dir)

    def get_leaf(name: str) -> np.ndarray:
        """The plan asks for leaves in iter_model_leaves order; keep only the current one."""
        while name not in current:
            current.clear()  # free the previous leaf before restoring the next
            got, arr = next(leaves)
            current[got] = np.asarray(arr)
            del arr
        return current[name]

    with atomic_directory(out_dir, overwrite) as tmp:
        hf = cfg.to_hf_dict(orthrus=True, dtype=dtype)
        hf["dtype"] = dtype  # transformers >= 5 reads "dtype", older versions "torch_dtype"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        copy_tokenizer_files(model_dir, tmp)
        tensors = hf_tensor_plan(cfg, specs, get_leaf)
        with tqdm(total=len(tensors), desc="writing tensors", unit="tensor",
                  disable=not progress, file=sys.stderr) as bar:
            write_hf_safetensors(tmp, cfg, tensors, int(max_shard_gb * (1 << 30)), bar.update)
    current.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.orbax_to_hf",
        description="Write an orthrus-jax model directory back in the HF Orthrus format "
                    "(safetensors + OrthrusLM config.json + tokenizer files).")
    parser.add_argument("--model", required=True,
                        help="orthrus-jax model directory (config.json + params/), e.g. from "
                             "convert.hf_to_orbax or training")
    parser.add_argument("--out", required=True,
                        help="output HF directory; must not exist (written beside it, then "
                             "renamed into place)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="split into model-0000i-of-0000n.safetensors shards + index above "
                             "this size (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_orbax_to_hf(args.model, args.out, args.overwrite,
                                               args.max_shard_gb, progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
