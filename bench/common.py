"""Shared bench plumbing: machine description, timestamped result files, target checks, timing."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense peak FLOP/s by accelerator name fragment (bf16 tensor cores; fp32 non-tensor in brackets is
# far lower, so MFU is only reported for bf16 compute). Sources: NVIDIA and Google datasheets.
PEAK_BF16_FLOPS = {
    "h200": 989e12, "h100": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12,
    "a100": 312e12, "a800": 312e12, "l40s": 362e12, "l4": 121e12, "a10": 125e12,
    "rtx 4090": 165e12, "rtx 5090": 209e12, "tpu v4": 275e12, "tpu v5 lite": 197e12,
    "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
}


def parse_with_command(parser: argparse.ArgumentParser,
                       argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv (default: the process's) and keep the exact command, `prog` plus those
    arguments, in args.command, so a record says how to rerun it even when called as a library."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = shlex.join([*shlex.split(parser.prog), *argv])
    return args


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    info = {
        "host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "backend": dev.platform, "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_BF16_FLOPS[name]
    return None


def stamp() -> tuple[str, str]:
    """(ISO date-time, file-name stamp) in local time."""
    now = datetime.datetime.now().astimezone()
    return now.isoformat(timespec="seconds"), now.strftime("%Y%m%d-%H%M%S")


def header(kind: str, args: Any) -> dict[str, Any]:
    date, file_stamp = stamp()
    return {"bench": kind, "date": date, "stamp": file_stamp, "command": args.command,
            "args": {k: v for k, v in vars(args).items() if k != "command"},
            "machine": machine_info()}


def result_path(out_dir: str, kind: str, file_stamp: str, ext: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{kind}-{file_stamp}.{ext}")


def write_record(out_dir: str, kind: str, record: dict[str, Any],
                 markdown: Callable[[dict[str, Any]], str], extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Write RECORD as KIND-STAMP.json and its markdown table as KIND-STAMP.md; returns the paths
    (also stored in record["files"]), with a path reserved for each extra extension (e.g. png)."""
    files = {"json": result_path(out_dir, kind, record["stamp"], "json"),
             "markdown": result_path(out_dir, kind, record["stamp"], "md")}
    files.update({ext: result_path(out_dir, kind, record["stamp"], ext) for ext in extra})
    record["files"] = files
    write_json(files["json"], record)
    with open(files["markdown"], "w") as f:
        f.write(markdown(record))
    return files


def write_json(path: str, record: dict[str, Any]) -> str:
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def md_preamble(title: str, record: dict[str, Any]) -> str:
    m = record["machine"]
    machine = (f"{m['backend']} ({m['device_kind']}), {m.get('cpu_model', m['processor'])}, "
               f"{m.get('cpu_affinity', m['cpu_count'])} cores, host {m['host']}, jax {m['jax']}")
    return (f"# {title}\n\n- date: {record['date']}\n- machine: {machine}\n"
            f"- command: `{record['command']}`\n")


def target(name: str, value: float | None, threshold: float | None, detail: str) -> dict[str, Any]:
    """A reported (never asserted) target check: PASS, MISS, or SKIP when not measured."""
    if value is None or threshold is None:
        status = "SKIP"
    else:
        status = "PASS" if value >= threshold else "MISS"
    return {"target": name, "status": status, "value": value, "threshold": threshold,
            "detail": detail}


def print_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        th = "n/a" if t["threshold"] is None else f"{t['threshold']:.3g}"
        print(f"[{t['status']}] {t['target']}: {v} (needs >= {th}); {t['detail']}")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds); fn must block until its device work is done (return host values)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Run fn `repeats` times; (last output, minimum seconds)."""
    best, out = float("inf"), None
    for _ in range(max(repeats, 1)):
        out, dt = timed(fn)
        best = min(best, dt)
    return out, best
