"""Peak RSS of convert.hf_to_orbax on a random-weights bf16 model of a real Qwen3 shape.

    python -m bench.convert_memory --size 0.6B --workdir /tmp/convmem

Writes sharded random safetensors (never allocating the whole model), converts them in a
subprocess, prints peak RSS against the model's bytes, and deletes everything it wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from convert.hf_params import write_safetensors_streaming

SHAPES = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
}


def write_random_model(size: str, hf_dir: str, n_shards: int = 2) -> int:
    hf = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
          "head_dim": 128, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "eos_token_id": 151645,
          "mask_token_id": 151669, **SHAPES[size]}
    d, f, hd = hf["hidden_size"], hf["intermediate_size"], 128
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="0.6B", help="Qwen3 shape")
    parser.add_argument("--workdir", default="/tmp/convmem", help="scratch dir (deleted after)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "out")
    try:
        model_bytes = write_random_model(args.size, hf_dir)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "convert.hf_to_orbax", "--hf-dir", hf_dir,
                        "--out", out, "--quiet"], check=True)
        secs = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"size={args.size} model_bytes={model_bytes / 2**30:.3f}GiB "
              f"peak_rss={peak / 2**30:.3f}GiB ratio={peak / model_bytes:.2f} seconds={secs:.0f}")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
