"""HF Qwen3 (or Orthrus-Qwen3) safetensors -> an orthrus-jax model directory (Orbax params).

    python -m convert.hf_to_orbax --hf-dir DIR --out DIR [--dtype auto|bf16|fp16|fp32]

Reads one tensor at a time into one stacked leaf, saves that leaf as its own Orbax item and frees
it before the next, so peak memory is about one leaf plus Orbax's copy of it (well under one copy
of the model). _diff twins are loaded when the checkpoint has them, else copied from the AR
attention (the Orthrus warm start). The output directory appears only when complete.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

from orthrus_jax.cli import ArgumentParser, parse_dtype, run_cli
from orthrus_jax.checkpoint import write_model_dir_streaming
from orthrus_jax.config import load_config
from orthrus_jax.params import param_summary
from orthrus_jax.hf import AUTO_DTYPE, count_hf_tensors, iter_hf_leaves


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = AUTO_DTYPE, overwrite: bool = False,
                        progress: bool = True) -> None:
    """Convert HF_DIR into the model directory OUT_DIR (atomically)."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output path already exists")
    cfg = load_config(hf_dir)
    total = count_hf_tensors(cfg, hf_dir)
    with tqdm(total=total, desc="converting tensors", unit="tensor", disable=not progress,
              file=sys.stderr) as bar:
        # Each numpy leaf goes straight to Orbax and is freed before the next is read, so
        # peak memory is about one stacked leaf (plus Orbax's copy of it), not the model.
        cfg, leaves = iter_hf_leaves(hf_dir, dtype, progress=bar.update, copy_diff=True)
        write_model_dir_streaming(out_dir, cfg, leaves, tokenizer_dir=hf_dir, overwrite=overwrite)
    if progress:
        print(f"wrote {out_dir}; {param_summary(cfg)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m convert.hf_to_orbax",
        description="Convert an HF Qwen3 / Orthrus-Qwen3 safetensors checkpoint into an "
                    "orthrus-jax model directory (config.json, tokenizer files, params/ Orbax).")
    parser.add_argument("--hf-dir", required=True,
                        help="HF directory: config.json, model.safetensors or "
                             "model.safetensors.index.json + shards, tokenizer files")
    parser.add_argument("--out", required=True,
                        help="output model directory; must not exist (written beside it, then "
                             "renamed into place)")
    parser.add_argument("--dtype", type=lambda v: v if v == AUTO_DTYPE else parse_dtype(v),
                        default=AUTO_DTYPE,
                        help="dtype of the stored parameters: auto (default) keeps the "
                             "checkpoint's, so HF -> Orbax -> HF is bit-identical; bf16, fp16 or "
                             "fp32 (float32, bfloat16, float16 accepted) cast every tensor")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_hf_to_orbax(args.hf_dir, args.out, args.dtype, args.overwrite,
                                               progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
