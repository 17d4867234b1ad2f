"""Compile-time memory of one training step at a real shape, without weights or a GPU.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m train.memcheck --config train/configs/qwen3-8b.yaml --devices 8 [--shape qwen3-8b]

Lowers the jitted step on abstract arrays (jax.ShapeDtypeStruct) for ONE device's share of the
recipe, a micro-batch of `global_batch / grad_accum / devices` rows (1 for the paper recipe), and
prints XLA's memory analysis: arguments (weights, optimizer state, batch), temporaries
(activations, logits, gradients), and the total. Params are counted unsharded (a single device
holding everything, the pessimistic case; FSDP over 8 devices divides weights and optimizer
state by 8). XLA CPU's buffer assignment is used when no accelerator is present, so the figures
are an estimate of the accelerator's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from orthrus_jax.cli import ArgumentParser, run_cli
from orthrus_jax.config import ConfigError
from orthrus_jax.params import param_shapes, param_summary, split_params
from orthrus_jax.shapes import SHAPE_NAMES, shape_config
from train.config import add_set_argument, load_config
from train.step import LossOptions, make_optimizer, make_train_step


def memcheck(tcfg, model_cfg, rows: int = 1, devices: int = 1) -> dict:
    """rows: rows per device per micro-batch; devices > 1: an FSDP mesh over that many (fake
    CPU) devices, weights / optimizer state / batch placed by orthrus_jax.sharding's rules, and
    the figures are per device."""
    from orthrus_jax import sharding as shd

    dt = jnp.dtype(tcfg.compute_dtype)
    model_cfg = dataclasses.replace(model_cfg, block_size=tcfg.block_size)
    backbone, trainable = split_params(param_shapes(model_cfg, dt))
    trainable = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), trainable)
    optimizer = make_optimizer(tcfg.b1, tcfg.b2, tcfg.weight_decay, tcfg.clip_norm)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    L, B, n = tcfg.seq_len, tcfg.anchors_per_row, rows * devices
    batch = {"tokens": jax.ShapeDtypeStruct((1, n, L), jnp.int32),
             "mask": jax.ShapeDtypeStruct((1, n, L), jnp.bool_),
             "anchors": jax.ShapeDtypeStruct((1, n, B), jnp.int32),
             "anchor_valid": jax.ShapeDtypeStruct((1, n, B), jnp.bool_)}
    if devices > 1:
        mesh = shd.make_mesh(1, devices, 1, jax.devices()[:devices])

        def place(tree, shardings):
            return jax.tree_util.tree_map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
        backbone = place(backbone, shd.param_shardings(backbone, mesh))
        trainable = place(trainable, shd.param_shardings(trainable, mesh))
        opt_state = place(opt_state, shd.state_shardings(opt_state, trainable, mesh))
        batch = place(batch, shd.batch_shardings(batch, mesh))
    opts = LossOptions(tcfg.block_size, dt, tcfg.remat, tcfg.anchor_chunks)
    step = jax.jit(make_train_step(model_cfg, opts, optimizer), donate_argnums=(0, 1))
    compiled = step.lower(trainable, opt_state, backbone, batch,
                          jax.ShapeDtypeStruct((), jnp.float32)).compile()
    mem = compiled.memory_analysis()
    gib = 1024 ** 3
    out = {"devices": devices, "rows_per_device": rows, "seq_len": L, "anchors": B, "K": tcfg.block_size,
           "anchor_chunks": tcfg.anchor_chunks, "remat": tcfg.remat,
           "argument_gib": mem.argument_size_in_bytes / gib,
           "temp_gib": mem.temp_size_in_bytes / gib,
           "output_gib": mem.output_size_in_bytes / gib,
           "alias_gib": mem.alias_size_in_bytes / gib}
    out["peak_estimate_gib"] = out["argument_gib"] + out["temp_gib"] + out["output_gib"] - out["alias_gib"]
    return out


def run(a: argparse.Namespace) -> None:
    tcfg = load_config(a.config, a.set)
    if a.shape not in SHAPE_NAMES:
        raise ConfigError(f"--shape {a.shape}: not one of {', '.join(SHAPE_NAMES)}")
    if a.devices > 1 and jax.device_count() < a.devices:
        raise ConfigError(f"--devices {a.devices}: only {jax.device_count()} devices; run with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={a.devices}")
    print(param_summary(shape_config(a.shape)))
    print(json.dumps(memcheck(tcfg, shape_config(a.shape), a.rows, a.devices)))


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m train.memcheck", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPE_NAMES)} (orthrus_jax.shapes)")
    ap.add_argument("--rows", type=int, default=1, help="rows per device per micro-batch")
    ap.add_argument("--devices", type=int, default=1,
                    help="FSDP over this many devices (fake CPU devices if needed)")
    add_set_argument(ap)
    a = ap.parse_args(argv)
    return run_cli(lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
