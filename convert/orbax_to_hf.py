"""An orthrus-jax model directory -> the HF Orthrus format (safetensors, OrthrusLM config).

    python -m convert.orbax_to_hf --model DIR --out DIR

The output holds every backbone tensor plus model.layers.N.self_attn.{q,k,v,o}_proj_diff.weight
and {q,k}_norm_diff.weight, in the stored dtype (bf16 stays bf16); tied embeddings write no
lm_head. config.json has architectures ["OrthrusLM"], block_size and mask_token_id (other fields
of the source config are kept), so trained heads load in the official PyTorch code; with
--modeling-file (its src/model.py) the output also loads through trust_remote_code. Leaves are
restored one at a time and their tensors written leaf-major (every layer's q_proj, then k_proj,
...), so peak memory is about one leaf.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from orthrus_jax.cli import ArgumentParser, run_cli
from orthrus_jax.checkpoint import (
    atomic_directory, copy_model_files, iter_model_leaves, model_leaf_specs, read_source_config,
)
from orthrus_jax.hf import hf_tensor_plan, write_hf_safetensors

MODELING_MODULE = "modeling_orthrus"  # the module name Orthrus exports use for remote code


def convert_orbax_to_hf(model_dir: str, out_dir: str, overwrite: bool = False,
                        max_shard_gb: float = 5.0, progress: bool = True,
                        modeling_file: str | None = None) -> None:
    """Write MODEL_DIR's parameters and config as an HF Orthrus directory OUT_DIR (atomically).

    modeling_file: the official Orthrus modeling code (its src/model.py, class OrthrusLM), copied
    in as modeling_orthrus.py with config auto_map set, so that
    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) builds OrthrusLM.
    Without it, an auto_map and modeling files already in MODEL_DIR are kept as they are.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output path already exists")
    if modeling_file is not None and not os.path.isfile(modeling_file):
        raise FileNotFoundError(2, "modeling file not found", modeling_file)
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
        hf = cfg.to_hf_dict(orthrus=True, dtype=dtype, base=read_source_config(model_dir))
        copy_model_files(model_dir, tmp)
        if modeling_file is not None:
            shutil.copyfile(modeling_file, os.path.join(tmp, MODELING_MODULE + ".py"))
            hf["auto_map"] = {**hf.get("auto_map", {}),
                              "AutoModelForCausalLM": f"{MODELING_MODULE}.OrthrusLM"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        tensors = hf_tensor_plan(cfg, specs, get_leaf)
        with tqdm(total=len(tensors), desc="writing tensors", unit="tensor",
                  disable=not progress, file=sys.stderr) as bar:
            write_hf_safetensors(tmp, cfg, tensors, int(max_shard_gb * (1 << 30)), bar.update)
    current.clear()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
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
    parser.add_argument("--modeling-file", default=None,
                        help="the official Orthrus modeling code (src/model.py of "
                             "chiennv2000/orthrus): copied in as modeling_orthrus.py, with config "
                             "auto_map set, so AutoModelForCausalLM.from_pretrained(OUT, "
                             "trust_remote_code=True) loads the heads")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_orbax_to_hf(args.model, args.out, args.overwrite,
                                               args.max_shard_gb, progress=not args.quiet,
                                               modeling_file=args.modeling_file))


if __name__ == "__main__":
    sys.exit(main())
