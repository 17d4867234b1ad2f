"""What limits the CPU demo's acceptance: a short sweep of the micro-cpu recipe, one change at a time.

    python -m bench.train_sweep [--work-dir sweep] [--steps 600] [--only base,lr2e-3]
    python -m bench.train_sweep --collect-only --work-dir sweep     # record runs already made

Every run starts from the copied heads and trains `--steps` optimizer steps of the
train/configs/micro-cpu.yaml recipe (one 512-token row per step, 48 anchors, K 32, LR 1e-3,
cosine over the steps, fp32) with one setting changed: the peak LR, the anchors per row, or the
number of distinct documents (the first 512 of the 2,048). Each exported model is measured by
train.eval_accept (20 dev prompts x 128 new tokens, greedy and T 0.7 / top-p 0.8 / top-k 20,
drafts accepted per cycle, bonus excluded). Data: train.make_data on the first 2,048 training
prompts (256 per chunk), the 512-document set is its first 2 chunks. Step seconds are the 10th
percentile and the median of the run's steps (the machine is shared: the 10th percentile is
the closest to the idle cost). Writes train-sweep-<stamp>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

from bench import common
from orthrus_jax import paths
from orthrus_jax.cli import ArgumentParser

CONFIG = "train/configs/micro-cpu.yaml"
CHUNK = 256  # train.make_data's default chunk size: subsets are whole chunks
# name -> (what changes, data documents, --set overrides)
RUNS: dict[str, tuple[str, int, dict[str, str]]] = {
    "base": ("none (LR 1e-3, 48 anchors, 2,048 documents)", 2048, {}),
    "lr5e-4": ("peak LR 5e-4", 2048, {"learning_rate": "5e-4"}),
    "lr2e-3": ("peak LR 2e-3", 2048, {"learning_rate": "2e-3"}),
    "a24": ("24 anchors per row", 2048, {"anchors_per_row": "24"}),
    "a96": ("96 anchors per row", 2048, {"anchors_per_row": "96"}),
    "data512": ("512 documents (~2 epochs)", 512, {}),
}


def _run(cmd: list[str], log: str, stdout: str | None = None) -> None:
    """Run cmd, its output (stderr only, when stdout goes to a file) in log; fail in one line."""
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        proc = subprocess.run(cmd, stdout=out if stdout else err, stderr=err)
    if proc.returncode:
        raise common.UsageError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")


def data_dir(work: str, docs: int, model: str, prompts: str) -> str:
    """sd-<docs>: the first docs/CHUNK chunks of one make_data run over 2,048 prompts."""
    from train.make_data import finalize

    out = os.path.join(work, "data", f"sd-{docs}")
    if os.path.exists(os.path.join(out, "offsets.npy")):
        return out
    full = os.path.join(work, "data", "sd")
    _run([sys.executable, "-m", "train.make_data", "--model", model, "--prompts", prompts,
          "--out", full, "--max-new-tokens", "128", "--limit", str(max(d for _, d, _ in
                                                                      RUNS.values()))],
         os.path.join(work, "make_data.log"))
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    for i in range(docs // CHUNK):
        name = f"chunk_{i:05d}.npz"
        shutil.copyfile(os.path.join(full, "chunks", name), os.path.join(out, "chunks", name))
    finalize(out, docs // CHUNK)
    return out


def train_and_eval(work: str, name: str, steps: int, model: str, prompts: str) -> None:
    _, docs, sets = RUNS[name]
    out = os.path.join(work, "runs", f"{name}-{steps}")
    if not os.path.isdir(os.path.join(out, "model")):
        overrides = {"model_dir": model, "data_dir": data_dir(work, docs, model, prompts),
                     "out_dir": out, "max_steps": str(steps), "schedule_by_time": "false",
                     "time_limit_s": "0", "export_at_minutes": "", "save_every": "200", **sets}
        _run([sys.executable, "-m", "train.run", "--config", CONFIG, "--set",
              *[f"{k}={v}" for k, v in overrides.items()]], out + ".log")
    evaluation = os.path.join(work, f"eval-{name}-{steps}.json")
    if not os.path.exists(evaluation):
        _run([sys.executable, "-m", "train.eval_accept", "--model", os.path.join(out, "model")],
             evaluation + ".log", stdout=evaluation + ".tmp")
        os.replace(evaluation + ".tmp", evaluation)


def collect(work: str, steps: int) -> list[dict[str, Any]]:
    rows = []
    for name, (change, docs, sets) in RUNS.items():
        evaluation = os.path.join(work, f"eval-{name}-{steps}.json")
        metrics = os.path.join(work, "runs", f"{name}-{steps}", "metrics.jsonl")
        if not (os.path.exists(evaluation) and os.path.exists(metrics)):
            continue
        with open(evaluation) as f:
            ev = json.load(f)
        log = [json.loads(line) for line in open(metrics) if line.strip()]
        step_s = np.array([r["step_s"] for r in log[5:]])
        tail = log[-50:]
        rows.append({
            "name": name, "change": change, "documents": docs, "overrides": sets, "steps": steps,
            "step_s_p10": float(np.percentile(step_s, 10)), "step_s_median": float(np.median(step_s)),
            "train_loss_last50": float(np.mean([r["loss"] for r in tail])),
            "train_accept_estimate_last50": float(np.mean([r["accept_len"] for r in tail])),
            "greedy": ev["greedy"], "sampled": ev["sampled"]})
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = [common.md_preamble("Training sweep: what limits the CPU demo's acceptance", record),
             f"- {record['note']}\n",
             "Dev acceptance (`train.eval_accept`: 20 dev prompts x 128 new tokens; AL = drafts "
             "accepted per cycle, bonus excluded) after "
             f"{record['steps']} steps from the copied heads:\n"]
    table = []
    for r in record["runs"]:
        g, s = r["greedy"], r["sampled"]
        pos = " / ".join(f"{x:.3f}" for x in g["position_acceptance"][:3])
        table.append([r["name"], r["change"], f"{r['step_s_p10']:.2f}", f"{g['acceptance_length']:.3f}",
                      f"{g['tpf']:.3f}", f"{s['acceptance_length']:.3f}", f"{s['tpf']:.3f}", pos,
                      f"{r['train_loss_last50']:.3f}", f"{r['train_accept_estimate_last50']:.2f}"])
    lines.append(common.md_table(
        ["run", "change", "s/step (p10)", "greedy AL", "greedy TPF", "sampled AL", "sampled TPF",
         "greedy acceptance of drafts 1 / 2 / 3", "train loss (last 50)",
         "train AL estimate (last 50)"], table))
    return "\n".join(lines) + "\n"


def chart(record: dict[str, Any], path: str) -> None:
    runs = record["runs"]
    common.bar_chart(path, [r["name"] for r in runs],
                     {"greedy AL": [r["greedy"]["acceptance_length"] for r in runs],
                      "sampled AL": [r["sampled"]["acceptance_length"] for r in runs]},
                     xlabel="run", ylabel="drafts accepted per cycle (dev)",
                     title=f"micro-cpu recipe, {record['steps']} steps, one change per run")


def run(args: argparse.Namespace) -> dict[str, Any]:
    only = [n for n in args.only.split(",") if n] if args.only else list(RUNS)
    unknown = [n for n in only if n not in RUNS]
    if unknown:
        raise common.UsageError(f"--only: unknown run {unknown[0]!r}; choose from {list(RUNS)}")
    os.makedirs(args.work_dir, exist_ok=True)
    if not args.collect_only:
        for name in only:
            train_and_eval(args.work_dir, name, args.steps, args.model, args.prompts)
    record = common.header("train-sweep", args)
    record["steps"] = args.steps
    record["runs"] = [r for r in collect(args.work_dir, args.steps) if r["name"] in only]
    if not record["runs"]:
        raise common.UsageError(f"--work-dir {args.work_dir}: no finished runs of {args.steps} steps")
    record["note"] = args.note or "runs made by this command"
    files = common.write_record(args.out_dir, "train-sweep", record, markdown,
                                chart=lambda path: chart(record, path))
    print(f"wrote {', '.join(files.values())}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.train_sweep", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="sweep", help="data, runs and evaluations (default sweep)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--model", default=paths.default_path(paths.MICRO_MODEL_DIR))
    p.add_argument("--prompts", default=paths.default_path(paths.TRAIN_PROMPTS))
    p.add_argument("--collect-only", action="store_true",
                   help="write the record from the finished runs in --work-dir, train nothing")
    p.add_argument("--note", default="", help="a line for the record (how the runs were made)")
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
