"""Training throughput (tokens/s) and, on an accelerator, MFU of the real train step.

    python -m bench.train --config train/configs/micro-cpu.yaml [--set key=value ...]
    python -m bench.train --shape qwen3-1.7b --set seq_len=2048 anchors_per_row=256 \
        global_batch=8 grad_accum=1 compute_dtype=bfloat16        # random weights, synthetic rows

With --config, the trainer is train.run.build(config) (model, data pipeline, mesh, optimizer, the
jitted train.step.make_train_step), its checkpoints redirected to a temporary directory; batches
come from the config's data_dir (made by `python -m train.make_data`). With --shape, the same step
runs on random weights at a Qwen3 shape (orthrus_jax.shapes; backbone initialised in the compute
dtype, _diff twins in fp32) and synthetic rows (all positions supervised, anchors drawn by
train.anchors.sample_anchors, as in training); that path imports nothing from grain, orbax or the data
pipeline: jax, flax, optax and numpy suffice (matplotlib only for the PNG, skipped without it).
After --warmup steps (compile), --steps steps are timed one by one. tokens/s = global_batch *
seq_len / step seconds, as train.run logs it.

MFU = model FLOPs per token x tokens/s / (devices x the device's dense peak for the compute
dtype); bf16/fp16 peaks only (bench.common.PEAK_BF16_FLOPS, matched on the device_kind's words),
otherwise n/a with the reason recorded. Model FLOPs per row token (matmuls 2 per multiply-add;
causal attention at half the scores; recompute from remat not counted):
  AR teacher pass   2 P + 2 L q_dim S                    (P: matmul params per token incl. head)
  diffusion pass    r (2 P + 4 L q_dim (S/2 + K))        (r = anchors x K / S block tokens per row token)
  backward          r (2 P + 8 L q_dim (S/2 + K) + 2 P_diff)   (input grads through every layer,
                                                          weight grads for the _diff twins only)
Writes train-<stamp>.{json,md,png} (PNG: tokens/s of each timed step).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import statistics
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from orthrus_jax.cli import ArgumentParser
from orthrus_jax.shapes import SHAPE_NAMES, shape_config
from train.config import add_set_argument

# ---------------------------------------------------------------------------------------------
# FLOPs model


def flops_per_token(cfg, seq_len: int, anchors_per_row: int, block_size: int) -> dict[str, float]:
    """Model FLOPs per packed-row token of one training step (see the module docstring)."""
    d, f, n_l, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    attn_proj = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
    p = n_l * (attn_proj + 3 * d * f) + d * v          # per view: one set of attention projections
    p_diff = n_l * attn_proj
    s, k = seq_len, block_size
    r = anchors_per_row * k / s
    ar = 2 * p + 2 * n_l * cfg.q_dim * s
    attn_diff = 4 * n_l * cfg.q_dim * (s / 2 + k)
    diff_fwd = r * (2 * p + attn_diff)
    bwd = r * (2 * p + 2 * attn_diff + 2 * p_diff)
    return {"ar_teacher": ar, "diffusion_forward": diff_fwd, "backward": bwd,
            "total": ar + diff_fwd + bwd, "block_tokens_per_row_token": r}


# ---------------------------------------------------------------------------------------------
# trainers


@dataclasses.dataclass
class Bench:
    model_cfg: Any
    mesh: Any
    step_fn: Any
    trainable: Any
    opt_state: Any
    backbone: Any
    batches: Any  # iterator of host batches {name: [global_batch, ...]}
    cleanup: Any = None  # called after timing


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def from_config(tcfg) -> Bench:
    """The trainer of train.run.build, its checkpoint manager pointed at a temporary directory."""
    from orthrus_jax.config import ConfigError
    from train.run import build, check_dir

    try:
        check_dir(tcfg, "data_dir")  # before the model loads
    except ConfigError as err:
        raise common.UsageError(f"{err}; or time random weights with --shape") from None

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    tr = build(dataclasses.replace(tcfg, out_dir=tmp))
    it = iter(tr.dataset.to_iter_dataset())

    def cleanup():
        tr.manager.close()
        shutil.rmtree(tmp, ignore_errors=True)

    return Bench(tr.model_cfg, tr.mesh, tr.step_fn, tr.trainable, tr.opt_state, tr.backbone, it,
                 cleanup)


def from_shape(tcfg, shape: str) -> Bench:
    """Random weights at an orthrus_jax.shapes shape; the same optimizer and step as train.run.build.

    The backbone is initialised directly in the compute dtype (Qwen3-8B: 16 GB in bf16, not 33 GB
    in fp32 first); the trainable _diff twins are then cast to fp32 masters, as train.run holds
    them."""
    from orthrus_jax import sharding as shd
    from orthrus_jax.params import init_params, split_params
    from train.anchors import sample_anchors
    from train.step import LossOptions, make_optimizer, make_train_step

    model_cfg = dataclasses.replace(shape_config(shape), block_size=tcfg.block_size)
    mesh = shd.make_mesh(tcfg.mesh_data, tcfg.mesh_fsdp, tcfg.mesh_tensor)
    dt = jnp.dtype(tcfg.compute_dtype)
    backbone, trainable = split_params(jax.jit(functools.partial(init_params, model_cfg, dtype=dt))(
        jax.random.PRNGKey(tcfg.seed)))
    backbone = jax.device_put(backbone, shd.param_shardings(backbone, mesh))
    trainable = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), trainable)
    trainable = jax.device_put(trainable, shd.param_shardings(trainable, mesh))
    optimizer = make_optimizer(tcfg.b1, tcfg.b2, tcfg.weight_decay, tcfg.clip_norm)
    opt_state = jax.jit(optimizer.init)(trainable)
    opt_state = jax.device_put(opt_state, shd.state_shardings(opt_state, trainable, mesh))
    opts = LossOptions(tcfg.block_size, dt, tcfg.remat, tcfg.anchor_chunks)
    step_fn = jax.jit(make_train_step(model_cfg, opts, optimizer), donate_argnums=(0, 1))

    def synthetic():
        rng = np.random.default_rng(tcfg.seed)
        n, s = tcfg.global_batch, tcfg.seq_len
        while True:
            tokens = rng.integers(1, model_cfg.vocab_size - 1, (n, s)).astype(np.int32)
            mask = np.ones((n, s), np.int32)
            mask[:, 0] = 0
            anc = [sample_anchors(row, tcfg.anchors_per_row, tcfg.block_size, rng) for row in mask]
            yield {"tokens": tokens, "mask": mask,
                   "anchors": np.stack([a for a, _ in anc]),
                   "anchor_valid": np.stack([v for _, v in anc])}

    return Bench(model_cfg, mesh, step_fn, trainable, opt_state, backbone, synthetic())


def time_steps(b: Bench, tcfg, warmup: int, steps: int) -> dict[str, Any]:
    """Run warmup + steps train steps; each timed until its outputs are ready (metrics on host)."""
    from orthrus_jax import sharding as shd

    accum = tcfg.grad_accum
    rows_local = tcfg.global_batch // jax.process_count() // accum
    times, compile_s, loss = [], 0.0, float("nan")
    with _mesh_context(b.mesh):
        for i in range(warmup + steps):
            host = next(b.batches)
            host = {k: np.asarray(v).reshape(accum, rows_local, *np.shape(v)[1:])
                    for k, v in host.items()}
            batch = jax.block_until_ready(shd.put_batch(host, b.mesh))

            def one():
                tr, opt, metrics = b.step_fn(b.trainable, b.opt_state, b.backbone, batch,
                                             np.float32(tcfg.learning_rate))
                jax.block_until_ready((tr, opt))
                return tr, opt, jax.device_get(metrics)

            (b.trainable, b.opt_state, metrics), dt = common.timed(one)
            loss = float(metrics["loss"])
            if i < warmup:
                compile_s += dt
            else:
                times.append(dt)
    tokens = tcfg.global_batch * tcfg.seq_len
    med = statistics.median(times)
    return {"warmup_steps": warmup, "warmup_s": compile_s, "steps": steps, "step_s": times,
            "step_s_median": med, "tokens_per_step": tokens, "tokens_per_s": tokens / med,
            "last_loss": loss}


# ---------------------------------------------------------------------------------------------
# driver


def markdown(record: dict[str, Any]) -> str:
    t, fl, tc = record["timing"], record["flops_per_token"], record["train_config"]
    lines = [common.md_preamble("Training throughput", record),
             f"- model: {record['model']}; seq_len {tc['seq_len']}, anchors/row "
             f"{tc['anchors_per_row']}, K {tc['block_size']}, global batch {tc['global_batch']} "
             f"(accum {tc['grad_accum']}), compute {tc['compute_dtype']}, remat {tc['remat']}",
             f"- {t['steps']} timed steps after {t['warmup_steps']} warm-up ({t['warmup_s']:.1f} s)",
             "- model FLOPs per token: AR teacher + diffusion forward + backward (input grads "
             "through all layers, weight grads for the _diff twins); remat recompute not counted",
             f"- peak: {record['peak_source']}\n"]
    lines.append(common.md_table(
        ["step s (median)", "tokens/step", "tokens/s", "GFLOP/token", "TFLOP/s", "peak TFLOP/s",
         "MFU"],
        [[t["step_s_median"], t["tokens_per_step"], t["tokens_per_s"], fl["total"] / 1e9,
          record["achieved_flops"] / 1e12,
          None if record["peak_flops"] is None else record["peak_flops"] / 1e12,
          "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f} %"]]))
    return "\n".join(lines) + "\n"


def plot(path: str, record: dict[str, Any]) -> None:
    t = record["timing"]
    common.bar_chart(
        path, [str(i + 1) for i in range(t["steps"])],
        {"tokens/s": [t["tokens_per_step"] / dt for dt in t["step_s"]]},
        xlabel="timed step", ylabel="row tokens/s",
        title=(f"train tokens/s per timed step (median {t['tokens_per_s']:.0f})\n"
               f"{record['model']}, {common.device_label(record['machine'])}, "
               f"{record['date'][:10]}"))


def mfu(achieved: float, machine: dict[str, Any], dtype: str, n: int) -> dict[str, Any]:
    """{"peak_flops": n devices (the mesh's) x per-device peak or None, "peak_source": where
    from / why not, "mfu": achieved / peak or None}."""
    peak, source = common.peak_flops(machine["device_kind"], dtype, machine["backend"])
    if peak is None:
        return {"peak_flops": None, "peak_source": source, "mfu": None}
    return {"peak_flops": peak * n, "peak_source": f"{n} x {peak / 1e12:.0f} TFLOP/s, {source}",
            "mfu": achieved / (peak * n)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from train.config import load_config

    if not args.shape and not args.config and not args.set:
        raise common.UsageError("give --config (real model and data) or --shape (random weights)")
    if args.steps < 1 or args.warmup < 0:
        raise common.UsageError(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 "
                                f"and warmup >= 0")
    try:
        tcfg = load_config(args.config, args.set)
    except (OSError, ValueError, TypeError) as err:
        raise common.UsageError(f"config: {' '.join(str(err).split())}") from None
    if args.shape:
        if args.shape not in SHAPE_NAMES:
            raise common.UsageError(f"--shape {args.shape!r}: choose from {', '.join(SHAPE_NAMES)}")
    record = common.header("train", args)
    if args.shape:
        if not tcfg.model_dir:
            tcfg = dataclasses.replace(tcfg, model_dir=f"random:{args.shape}")
        b = from_shape(tcfg, args.shape)
        model = f"random weights, {args.shape} shape"
    else:
        b = from_config(tcfg)
        model = tcfg.model_dir
    try:
        timing = time_steps(b, tcfg, args.warmup, args.steps)
    finally:
        if b.cleanup is not None:
            b.cleanup()
    fl = flops_per_token(b.model_cfg, tcfg.seq_len, tcfg.anchors_per_row, tcfg.block_size)
    achieved = fl["total"] * timing["tokens_per_s"]
    record.update(model=model, model_config=dataclasses.asdict(b.model_cfg),
                  train_config=dataclasses.asdict(tcfg), timing=timing, flops_per_token=fl,
                  achieved_flops=achieved, mesh_devices=b.mesh.devices.size,
                  **mfu(achieved, record["machine"], tcfg.compute_dtype, b.mesh.devices.size))
    files = common.write_record(args.out_dir, "train", record, markdown,
                                chart=lambda path: plot(path, record))
    util = ("n/a (" + record["peak_source"] + ")" if record["mfu"] is None
            else f"{100 * record['mfu']:.1f} %")
    print(f"train step {timing['step_s_median']:.3f} s median over {args.steps}, "
          f"{timing['tokens_per_s']:.0f} tokens/s, {fl['total'] / 1e9:.3g} GFLOP/token, "
          f"{achieved / 1e12:.3g} TFLOP/s, MFU {util}")
    print(f"wrote {', '.join(files.values())}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="train YAML (train/configs/*.yaml)")
    add_set_argument(p)
    p.add_argument("--shape", default=None,
                   help=f"random weights at a shape ({', '.join(SHAPE_NAMES)}) and "
                        "synthetic rows, instead of the config's model and data")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compile) first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
