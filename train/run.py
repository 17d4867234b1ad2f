"""Train the diffusion view of an Orthrus model by self-distillation from its frozen AR view.

    python -m train.run --config train/configs/micro-cpu.yaml [--set key=value ...]

Resumes from the latest checkpoint in OUT_DIR/checkpoints (trainable tree, optimizer state,
step, data iterator position). Writes OUT_DIR/metrics.jsonl, OUT_DIR/training.png and, at the
end, a full model dir OUT_DIR/model (backbone from model_dir + trained heads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from orthrus_jax.cli import ArgumentParser, run_cli
from orthrus_jax.config import ConfigError
from orthrus_jax import sharding as shd
from orthrus_jax.checkpoint import load_any_model, write_model_dir_streaming
from orthrus_jax.params import iter_leaves, merge_params, param_summary, split_params
from train.config import TrainConfig, add_set_argument, export_minutes, load_config
from train.data import PackedRows, DocSource, make_dataset
from train.step import LossOptions, cosine_lr, make_optimizer, make_train_step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left intact."""


@dataclasses.dataclass
class Trainer:
    cfg: TrainConfig
    model_cfg: Any
    mesh: Any
    backbone: Any
    trainable: Any
    opt_state: Any
    optimizer: Any
    schedule: Any
    step_fn: Any
    dataset: Any
    total_steps: int
    manager: ocp.CheckpointManager


def _tree_copy(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def check_micro_batch(cfg: TrainConfig, mesh) -> None:
    """The rows of a micro-batch must split evenly over data x fsdp devices (and processes):
    otherwise the batch would be silently replicated (fit_spec drops the axis) or uneven."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    pc = jax.process_count()
    mb = cfg.micro_batch
    if mb % devices:
        raise ConfigError(
            f"micro-batch global_batch/grad_accum = {cfg.global_batch}/{cfg.grad_accum} = {mb} rows "
            f"is not a multiple of the mesh's data x fsdp = {mesh.shape['data']} x "
            f"{mesh.shape['fsdp']} = {devices} devices (mesh {dict(mesh.shape)}): choose "
            f"global_batch, grad_accum or mesh_data/mesh_fsdp so that it is")
    if mb % pc:
        raise ConfigError(f"micro-batch global_batch/grad_accum = {mb} rows is not a multiple of "
                          f"the {pc} processes")


REQUIRED_FILE = {"model_dir": "config.json", "data_dir": "offsets.npy"}


def check_dir(cfg: TrainConfig, key: str) -> None:
    """ConfigError naming the key unless cfg's model_dir / data_dir holds what training reads."""
    path, need = getattr(cfg, key), REQUIRED_FILE[key]
    if not path:
        raise ConfigError(f"config: {key} is not set")
    if not os.path.isfile(os.path.join(path, need)):
        what = "directory not found" if not os.path.isdir(path) else f"no {need} in it"
        hint = " (make it with python -m train.make_data)" if key == "data_dir" else ""
        raise ConfigError(f"{key} {path}: {what}{hint}")


def check_dirs(cfg: TrainConfig) -> None:
    for key in REQUIRED_FILE:
        check_dir(cfg, key)


def build(cfg: TrainConfig) -> Trainer:
    check_dirs(cfg)
    shd.maybe_initialize_distributed(cfg.distributed)
    mesh = shd.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    check_micro_batch(cfg, mesh)
    dt = jnp.dtype(cfg.compute_dtype)
    model_cfg, params = load_any_model(cfg.model_dir, jnp.float32, mesh)
    if model_cfg.block_size != cfg.block_size:
        model_cfg = dataclasses.replace(model_cfg, block_size=cfg.block_size)
    backbone, trainable = split_params(params)
    backbone = jax.device_put(jax.tree_util.tree_map(lambda x: x.astype(dt), backbone),
                              shd.param_shardings(backbone, mesh))
    trainable = jax.device_put(_tree_copy(trainable), shd.param_shardings(trainable, mesh))

    pc = jax.process_count()
    rows_local = cfg.global_batch // pc
    rows = PackedRows(DocSource(cfg.data_dir), cfg.seq_len, cfg.seed, 1)
    batches_per_epoch = rows.rows_per_epoch // cfg.global_batch
    if batches_per_epoch == 0:
        raise ConfigError(f"data_dir {cfg.data_dir}: fewer rows of seq_len={cfg.seq_len} "
                          f"({rows.rows_per_epoch}) than global_batch={cfg.global_batch}")
    total = cfg.max_steps or int(batches_per_epoch * cfg.epochs)
    data_epochs = math.ceil(total / batches_per_epoch) + 1
    dataset = make_dataset(cfg.data_dir, cfg.seq_len, cfg.anchors_per_row, cfg.block_size,
                           rows_local, cfg.seed, data_epochs, jax.process_index(), pc)
    horizon = cfg.schedule_steps or total

    def schedule(step: int, elapsed_s: float = 0.0) -> float:
        """LR for update `step` (0-based): by steps, or by wall clock when time_limit_s is set
        (whichever is further along), so a time-boxed run still decays to its floor."""
        progress = (step + 1) / horizon
        if cfg.time_limit_s and cfg.schedule_by_time:
            progress = max(progress, elapsed_s / cfg.time_limit_s)
        return cosine_lr(cfg.learning_rate, progress, cfg.warmup_frac, cfg.lr_floor)

    optimizer = make_optimizer(cfg.b1, cfg.b2, cfg.weight_decay, cfg.clip_norm)
    opt_state = jax.jit(optimizer.init)(trainable)
    opt_state = jax.device_put(opt_state, shd.state_shardings(opt_state, trainable, mesh))
    opts = LossOptions(cfg.block_size, dt, cfg.remat, cfg.anchor_chunks)
    step_fn = jax.jit(make_train_step(model_cfg, opts, optimizer), donate_argnums=(0, 1))
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(cfg.out_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_checkpoints, create=True,
            keep_period=cfg.keep_every or None, enable_async_checkpointing=False))
    return Trainer(cfg, model_cfg, mesh, backbone, trainable, opt_state, optimizer, schedule,
                   step_fn, dataset, total, manager)


def save(tr: Trainer, step: int, data_state: dict) -> None:
    tr.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"trainable": tr.trainable, "opt_state": tr.opt_state}),
        data=ocp.args.JsonSave(data_state)), force=True)
    tr.manager.wait_until_finished()


def restore(tr: Trainer) -> tuple[int, dict | None]:
    step = tr.manager.latest_step()
    if step is None:
        return 0, None
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"trainable": tr.trainable, "opt_state": tr.opt_state})
    got = tr.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    tr.trainable, tr.opt_state = got["state"]["trainable"], got["state"]["opt_state"]
    return step, got["data"]


def export(tr: Trainer, out_dir: str, dtype: str | None = None) -> str:
    """A full model dir: backbone + trained heads, loadable by infer and convert.

    Every process must call it: with several processes the globally sharded arrays are gathered
    (one leaf at a time) by all of them, and process 0 writes."""
    dt = jnp.dtype(dtype or tr.cfg.export_dtype)
    # One leaf at a time into host memory (never onto one device), cast there; Orbax writes host
    # numpy arrays (it refuses process-local jax.Arrays in a multi-process run).
    leaves = ((name, shd.to_host(x).astype(dt))
              for name, x in iter_leaves(merge_params(tr.backbone, tr.trainable)))
    if jax.process_index() == 0:
        write_model_dir_streaming(out_dir, tr.model_cfg, leaves, tr.cfg.model_dir, overwrite=True)
    else:
        for _ in leaves:   # the gathers are collective: every process takes part in each
            pass
    return out_dir


def same_on_all_processes(x: float) -> float:
    """Process 0's value of a host float: what is decided from a wall clock (the LR by time,
    exports, the time limit) must agree across processes, or their collectives diverge."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    return float(multihost_utils.broadcast_one_to_all(np.float32(x)))


def plot_metrics(log_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    w = max(1, min(50, len(rows) // 10))

    def smooth(x):
        x = np.asarray(x, float)
        return np.convolve(x, np.ones(w) / w, mode="valid")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, ylabel, title in ((axes[0], "loss", "KL(p_AR || p_diff)", "loss"),
                                   (axes[1], "accept_len", "sum_i prod_{j<=i} agree_j",
                                    "estimated acceptance length")):
        vals = [r[key] for r in rows]
        ax.plot(steps, vals, lw=0.4, alpha=0.3, color="C0")
        ax.plot(steps[w - 1:], smooth(vals), lw=1.5, color="C0", label=f"mean of {w} steps")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
    axes[1].set_ylim(0, max(3.0, float(np.percentile([r["accept_len"] for r in rows], 99))))
    first, last = rows[: min(len(rows), 100)], rows[-min(len(rows), 100):]
    for chunk, label in ((first, f"first {len(first)} steps"), (last, f"last {len(last)} steps")):
        agree = np.mean([r["agree"] for r in chunk], axis=0)
        axes[2].plot(np.arange(len(agree)), agree, marker=".", label=label)
    axes[2].set(xlabel="block position i (predicts x_{a+i+1})", ylabel="top-1 agreement with AR",
                title="per-position agreement", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    tr = build(cfg)
    step, data_state = restore(tr)
    it = iter(tr.dataset.to_iter_dataset())
    elapsed0 = 0.0
    if data_state is not None:
        it.set_state(data_state["iterator"])
        elapsed0 = float(data_state.get("elapsed_s", 0.0))
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    png_path = os.path.join(cfg.out_dir, "training.png")
    minutes = [m for m in export_minutes(cfg.export_at_minutes)
               if not os.path.isdir(os.path.join(cfg.out_dir, f"model-{m:g}min"))]
    accum, rows_local = cfg.grad_accum, cfg.global_batch // jax.process_count() // cfg.grad_accum
    tokens_per_step = cfg.global_batch * cfg.seq_len
    is_main = jax.process_index() == 0
    if is_main:
        print(param_summary(tr.model_cfg), flush=True)
    bar = tqdm(total=tr.total_steps, initial=step, desc="train", unit="step", disable=not is_main)
    train_time, summary = 0.0, {}
    last_saved = step
    if is_main and os.path.exists(log_path):  # keep the log consistent with the checkpoint
        kept = [l for l in open(log_path) if l.strip() and json.loads(l)["step"] <= step]
        with open(log_path, "w") as f:  # no checkpoint (step 0): an empty log
            f.writelines(kept)
    with jax.set_mesh(tr.mesh):
        while step < tr.total_steps:
            host = next(it)
            host = {k: v.reshape(accum, rows_local, *v.shape[1:]) for k, v in host.items()}
            batch = shd.put_batch(host, tr.mesh)
            lr = tr.schedule(step, elapsed0 + train_time)
            t0 = time.time()
            trainable, opt_state, metrics = tr.step_fn(tr.trainable, tr.opt_state, tr.backbone,
                                                       batch, jnp.float32(lr))
            metrics = jax.device_get(metrics)
            dt = time.time() - t0
            loss = float(metrics["loss"])
            if not (math.isfinite(loss) and bool(metrics["finite"])):
                bar.close()
                raise NonFiniteLoss(f"step {step + 1}: loss {loss}, grad norm "
                                    f"{float(metrics['grad_norm'])} or updated weights not finite; "
                                    f"stopping, the last good checkpoint is step "
                                    f"{tr.manager.latest_step()}")
            tr.trainable, tr.opt_state = trainable, opt_state
            step += 1
            train_time = same_on_all_processes(train_time + dt)  # LR, export, stop: in step
            record = {"step": step, "loss": loss, "accept_len": float(metrics["accept_len"]),
                      "agree": [round(float(a), 4) for a in metrics["agree"]],
                      "grad_norm": float(metrics["grad_norm"]), "targets": int(metrics["targets"]),
                      "lr": lr, "step_s": dt,
                      "tokens_per_s": tokens_per_step / dt, "elapsed_s": elapsed0 + train_time}
            summary = record
            if is_main:
                if step % cfg.log_every == 0 or step == tr.total_steps:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{record['accept_len']:.2f}",
                                lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
                if cfg.plot_every and step % cfg.plot_every == 0:
                    plot_metrics(log_path, png_path)
            export_now = bool(minutes) and record["elapsed_s"] >= 60 * minutes[0]
            if step % cfg.save_every == 0 or step == tr.total_steps or export_now:
                save(tr, step, {"iterator": it.get_state(), "elapsed_s": elapsed0 + train_time})
                last_saved = step   # each step is saved at most once
            if export_now:
                export(tr, os.path.join(cfg.out_dir, f"model-{minutes.pop(0):g}min"))
            if cfg.export_every and step % cfg.export_every == 0:
                export(tr, os.path.join(cfg.out_dir, f"model-step{step}"))
            if cfg.time_limit_s and record["elapsed_s"] >= cfg.time_limit_s:
                break
    bar.close()
    if last_saved != step:
        save(tr, step, {"iterator": it.get_state(), "elapsed_s": elapsed0 + train_time})
    if is_main and os.path.exists(log_path):
        plot_metrics(log_path, png_path)
    if cfg.export_at_end:
        export(tr, os.path.join(cfg.out_dir, "model"))
    tr.manager.close()
    return {"step": step, **summary}


def run(a: argparse.Namespace) -> None:
    cfg = load_config(a.config, a.set)
    if a.export:
        tr = build(cfg)
        step, _ = restore(tr)
        export(tr, a.export)
        if jax.process_index() == 0:
            print(f"exported step {step} to {a.export}")
        return
    out = train(cfg)
    print(json.dumps({k: v for k, v in out.items() if k != "agree"}))


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m train.run", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file (train/configs/*.yaml)")
    add_set_argument(ap)
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="only export the latest checkpoint as a full model dir, then exit")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return run_cli(lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
