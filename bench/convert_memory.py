"""Peak RSS of convert.hf_to_orbax on a random-weights bf16 model of a real Qwen3 shape.

    python -m bench.convert_memory --size qwen3-0.6b [--workdir DIR]

Writes sharded random safetensors (never allocating the whole model), converts them in a
subprocess that reports its own peak RSS (VmHWM), prints it against the model's bytes, and
deletes everything it wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from bench.common import parse_with_command
from orthrus_jax.hf import write_safetensors_streaming
from orthrus_jax.cli import ArgumentParser
from orthrus_jax.shapes import QWEN3_SIZES, qwen3_hf_config

# A small shape for the test (~0.18 GB, largest leaf 32 MiB): Qwen3-0.6B's layout, narrowed.
TEST_SHAPE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32768)
SIZES = (*QWEN3_SIZES, "test")


def write_random_model(size: str, hf_dir: str, n_shards: int = 2) -> int:
    hf = qwen3_hf_config("qwen3-0.6b" if size == "test" else size, eos_token_id=151645,
                         **(TEST_SHAPE if size == "test" else {}))
    hf["mask_token_id"] = hf["vocab_size"] - 1
    d, f, hd = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (hf["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def thunk(shape):
        return lambda: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(bf16)

    items = [(k, thunk(s), s, bf16) for k, s in shapes.items()]
    os.makedirs(hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump(hf, fh)
    per = -(-len(items) // n_shards)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors_streaming(os.path.join(hf_dir, name), items[s * per:(s + 1) * per])
        weight_map.update({k: name for k, *_ in items[s * per:(s + 1) * per]})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return sum(int(np.prod(s)) * 2 for s in shapes.values())


# The child reports its own high-water RSS (VmHWM). Not the parent's RUSAGE_CHILDREN: a child
# made by (v)fork starts with the parent's RSS on the books, which counts into its ru_maxrss.
_CHILD = """
import atexit, runpy, sys
def report():
    hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print("VmHWM_KiB", hwm, flush=True)
atexit.register(report)
sys.argv = ["convert.hf_to_orbax", *sys.argv[1:]]
runpy.run_module("convert.hf_to_orbax", run_name="__main__", alter_sys=True)
"""


def baseline_rss() -> int:
    """Peak RSS in bytes of a process that only imports the converter and starts JAX."""
    code = ("import jax.numpy as jnp, convert.hf_to_orbax, orthrus_jax.hf, "
            "orthrus_jax.checkpoint; jnp.zeros(1).block_until_ready()\n" + _CHILD.split("sys.argv")[0])
    got = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True)
    return int(got.stdout.split("VmHWM_KiB")[-1].split()[0]) * 1024


def converter_peak_rss(hf_dir: str, out: str, *extra: str) -> int:
    """Peak RSS in bytes of `python -m convert.hf_to_orbax` converting hf_dir into out."""
    got = subprocess.run([sys.executable, "-c", _CHILD, "--hf-dir", hf_dir, "--out", out,
                          "--quiet", *extra], check=True, stdout=subprocess.PIPE, text=True)
    return int(got.stdout.split("VmHWM_KiB")[-1].split()[0]) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.convert_memory",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="qwen3-0.6b", help="Qwen3 shape")
    parser.add_argument("--workdir", default=None,
                        help="scratch dir, deleted after (default: a new temporary directory)")
    args = parse_with_command(parser, argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="convmem-")
    print("command:", args.command, flush=True)  # for the record: the exact command line
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "out")
    try:
        model_bytes = write_random_model(args.size, hf_dir)
        t0 = time.time()
        peak = converter_peak_rss(hf_dir, out)
        secs = time.time() - t0
        base = baseline_rss()
        print(f"size={args.size} model_bytes={model_bytes / 2**30:.3f}GiB "
              f"peak_rss={peak / 2**30:.3f}GiB ratio={peak / model_bytes:.2f} seconds={secs:.0f} "
              f"baseline_rss={base / 2**30:.3f}GiB "
              f"(peak-baseline)/model={(peak - base) / model_bytes:.2f}")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
