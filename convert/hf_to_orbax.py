"""HF Qwen3 (or Orthrus-Qwen3) safetensors -> an orthrus-jax model directory (Orbax params).

    python -m convert.hf_to_orbax --hf-dir DIR --out DIR [--dtype bf16|fp32]

Reads one tensor at a time and fills each stacked leaf once, so peak memory stays near one copy
of the model. _diff twins are loaded when the checkpoint has them, else copied from the AR
attention (the Orthrus warm start). The output directory appears only when complete.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
from tqdm import tqdm

from convert.errors import run_cli
from convert.hf_params import DTYPES, assemble, count_hf_tensors, iter_hf_leaves
from orthrus_jax.checkpoint import write_model_dir
from orthrus_jax.config import load_config


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = "bf16", overwrite: bool = False,
                        progress: bool = True) -> None:
    """Convert HF_DIR into the model directory OUT_DIR (atomically)."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output path already exists")
    cfg = load_config(hf_dir)
    total = count_hf_tensors(cfg, hf_dir)
    with tqdm(total=total, desc="reading tensors", unit="tensor", disable=not progress,
              file=sys.stderr) as bar:
        cfg, leaves = iter_hf_leaves(hf_dir, dtype, progress=bar.update)
        # Hand each leaf to JAX as soon as it is filled, so at most one numpy leaf is alive.
        # (Saving numpy leaves instead measured worse: 3.45x vs 2.36x the model bytes.)
        params = assemble(cfg, ((name, jnp.asarray(arr)) for name, arr in leaves))
    if progress:
        print(f"writing {out_dir}", file=sys.stderr)
    write_model_dir(out_dir, cfg, params, tokenizer_dir=hf_dir, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.hf_to_orbax",
        description="Convert an HF Qwen3 / Orthrus-Qwen3 safetensors checkpoint into an "
                    "orthrus-jax model directory (config.json, tokenizer files, params/ Orbax).")
    parser.add_argument("--hf-dir", required=True,
                        help="HF directory: config.json, model.safetensors or "
                             "model.safetensors.index.json + shards, tokenizer files")
    parser.add_argument("--out", required=True,
                        help="output model directory; must not exist (written beside it, then "
                             "renamed into place)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of the stored parameters (default bf16; bf16 input stays "
                             "bit-identical)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_hf_to_orbax(args.hf_dir, args.out, args.dtype, args.overwrite,
                                               progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
