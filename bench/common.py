"""Shared bench plumbing: machine description, timestamped result files, target checks, timing."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from orthrus_jax import paths

# bench/results of this clone; records name it (and every path below the repo) repo-relative
DEFAULT_OUT_DIR = paths.default_path(paths.REPO_ROOT / "bench" / "results")

# Dense (no sparsity) tensor-core peak FLOP/s for bf16/fp16 matmuls, per device, keyed by the
# words of jax's device_kind (e.g. "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe"
# the PCIe one); the most specific key whose words all occur wins. Sources: NVIDIA and Google
# datasheets. No float32 peaks: XLA may run float32 matmuls as TF32 or as full fp32
# (jax_default_matmul_precision), whose peaks differ ~8x, so MFU is n/a for float32 compute.
PEAK_BF16_FLOPS: dict[tuple[str, ...], float] = {
    ("h100",): 989e12, ("h100", "pcie"): 756e12, ("h100", "nvl"): 835e12,
    ("h200",): 989e12, ("h200", "nvl"): 835e12, ("gh200",): 989e12,
    ("h800",): 989e12, ("h800", "pcie"): 756e12, ("h20",): 148e12, ("b200",): 2250e12,
    ("a100",): 312e12, ("a800",): 312e12, ("a10",): 125e12,
    ("l40s",): 362e12, ("l40",): 181e12, ("l4",): 121e12,
    ("rtx", "4090"): 165e12, ("rtx", "5090"): 209e12,
    ("tpu", "v4"): 275e12, ("tpu", "v5", "lite"): 197e12, ("tpu", "v5e"): 197e12,
    ("tpu", "v5"): 459e12, ("tpu", "v5p"): 459e12, ("tpu", "v6", "lite"): 918e12,
    ("tpu", "v6e"): 918e12,
}
PEAK_DTYPES = ("bfloat16", "float16")  # dtypes PEAK_BF16_FLOPS applies to


class UsageError(Exception):
    """A bad request found after parsing (missing data, too few prompts): one line, exit 2."""


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
             argv: Sequence[str] | None = None) -> Any:
    """parse_with_command, then run(args); a UsageError becomes `PROG: error: MESSAGE`, exit 2."""
    args = parse_with_command(parser, argv)
    try:
        return run(args)
    except UsageError as err:
        parser.error(str(err))


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
        "jax": jax.__version__, "jaxlib": _jaxlib_version(),
        "backend": dev.platform, "device_kind": dev.device_kind,
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
    load = load_avg()
    if load is not None:
        info["load_avg"] = load
    if dev.platform == "gpu":
        info.update(gpu_info(dev))
    return info


def _jaxlib_version() -> str | None:
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def load_avg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_info(dev: Any) -> dict[str, Any]:
    """What is cheaply known about the GPU stack; every field is optional (never raises)."""
    out: dict[str, Any] = {}
    try:
        out["platform_version"] = dev.client.platform_version  # e.g. "cuda 12080"
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        from jax._src.lib import cuda_versions  # private; None on CPU/ROCm builds
        if cuda_versions is not None:
            out["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            out["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001
        pass
    try:
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            out["device_memory_limit_bytes"] = int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            got = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)
            line = got.stdout.strip().splitlines()[0]
            name, driver, mem, clock = [x.strip() for x in line.split(",")]
            out.update(nvidia_smi_name=name, driver=driver, gpu_memory=mem, max_sm_clock=clock)
        except Exception:  # noqa: BLE001
            pass
    return out


def peak_flops(device_kind: str, dtype: str, backend: str = "gpu") -> tuple[float | None, str]:
    """(dense peak FLOP/s of one device for matmuls in dtype, source or reason it is unknown)."""
    if backend == "cpu":
        return None, "no accelerator peak (CPU)"
    words = set(re.findall(r"[a-z0-9]+", device_kind.lower()))
    keys = [k for k in PEAK_BF16_FLOPS if set(k) <= words]
    if not keys:
        return None, f"no peak known for device {device_kind!r}"
    key = max(keys, key=len)
    if dtype not in PEAK_DTYPES:
        return None, (f"no {dtype} peak: XLA may run {dtype} matmuls on tensor cores (TF32) or "
                      f"not, so MFU is only given for {'/'.join(PEAK_DTYPES)} compute")
    return PEAK_BF16_FLOPS[key], f"dense bf16 peak of {' '.join(key)}"


def stamp() -> tuple[str, str]:
    """(ISO date-time, file-name stamp) in local time."""
    now = datetime.datetime.now().astimezone()
    return now.isoformat(timespec="seconds"), now.strftime("%Y%m%d-%H%M%S")


RECORDED_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION")


def header(kind: str, args: Any) -> dict[str, Any]:
    date, file_stamp = stamp()
    return {"bench": kind, "date": date, "stamp": file_stamp, "command": args.command,
            "args": {k: repo_relative(v) for k, v in vars(args).items() if k != "command"},
            "environment": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
            "machine": machine_info()}


def repo_relative(value: Any) -> Any:
    """An absolute path below the repository as a repo-relative one (records must not name the
    machine's directories); anything else unchanged."""
    if isinstance(value, str) and os.path.isabs(value):
        try:
            return str(pathlib.Path(value).resolve().relative_to(paths.REPO_ROOT))
        except ValueError:
            return value
    return value


def result_path(out_dir: str, kind: str, file_stamp: str, ext: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{kind}-{file_stamp}.{ext}")


def write_record(out_dir: str, kind: str, record: dict[str, Any],
                 markdown: Callable[[dict[str, Any]], str],
                 chart: Callable[[str], None] | None = None) -> dict[str, str]:
    """Write RECORD as KIND-STAMP.json, its markdown as KIND-STAMP.md and, given chart (which
    draws a PNG at the path it is given) and where matplotlib is installed, KIND-STAMP.png.
    Also stamps record["load_avg_end"]. Returns the paths (also stored in record["files"])."""
    files = {"json": result_path(out_dir, kind, record["stamp"], "json"),
             "markdown": result_path(out_dir, kind, record["stamp"], "md")}
    if chart is not None:
        if have_matplotlib():
            files["png"] = result_path(out_dir, kind, record["stamp"], "png")
        else:
            record["png_skipped"] = "matplotlib is not installed"
    record["files"] = {k: repo_relative(v) for k, v in files.items()}
    record["load_avg_end"] = load_avg()
    write_json(files["json"], record)
    with open(files["markdown"], "w") as f:
        f.write(markdown(record))
    if "png" in files:
        chart(files["png"])
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
    if m.get("driver") or m.get("cuda_runtime"):
        machine += f", CUDA runtime {m.get('cuda_runtime', '?')}, driver {m.get('driver', '?')}"

    def load(v: Any) -> str:
        return "n/a" if not v else " / ".join(f"{x:.2f}" for x in v)

    return (f"# {title}\n\n- date: {record['date']}\n- machine: {machine}\n"
            f"- load average (1 / 5 / 15 min): {load(m.get('load_avg'))} at the start, "
            f"{load(record.get('load_avg_end'))} at the end\n"
            f"- command: `{record['command']}`\n"
            + "".join(f"- environment: `{k}={v}`\n"
                      for k, v in (record.get("environment") or {}).items()))


def device_label(machine: dict[str, Any]) -> str:
    """"cpu", or "gpu NVIDIA H100 80GB HBM3": for chart titles."""
    b, k = machine["backend"], machine["device_kind"]
    return b if k == b else f"{b} {k}"


def scale_caveat(machine: dict[str, Any]) -> str:
    """One sentence for a micro-model record: which of its figures carry over to real models."""
    if machine["backend"] == "cpu":
        return ("On this CPU the micro model is compute-bound: ratios transfer, absolute figures "
                "do not.")
    return (f"Ours on {device_label(machine)}: the micro model (4M parameters) is far too small "
            "to load that device, so fixed per-step costs dominate; absolute figures do not "
            "transfer to larger models.")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def bar_chart(path: str, groups: Sequence[str], series: dict[str, Sequence[float]], *,
              xlabel: str, ylabel: str, title: str, log: bool = False) -> None:
    """Grouped bars, one colour per series, value labels; saved as a PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.6 + 1.5 * len(groups))), 4.2))
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for j, (label, vals) in enumerate(series.items()):
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.0f" if max(vals, default=0) >= 10 else "%.3g", fontsize=7)
    ax.set_xticks(x, list(groups))
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 8 if log else hi * 1.25)  # headroom for the legend and labels
    ax.legend(fontsize=8, loc="upper left", ncol=len(series))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
