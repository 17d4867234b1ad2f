"""GPU decode timings at real Qwen3 shapes with random weights, against the weight-streaming floor.

    python -m bench.gpu                           # Qwen3-1.7B and Qwen3-8B shapes, bf16, on a GPU
    python -m bench.gpu --shape tiny              # the same code path on CPU with a tiny config

Per shape: random weights (orthrus_jax.params.init_params, bf16); memory bandwidth measured with a
large jitted elementwise copy (bytes read + written / best time; the method is recorded in the
JSON); AR ms per token = (generate time - prefill) / loop steps of
infer.decoder.generate(mode="ar"); Orthrus ms per cycle the same for mode="orthrus" (one diffusion
pass + one verify pass of K tokens). Each mode is compiled by one untimed run, then timed
--repeats times: the best is the headline, the median and every sample are in the JSON. The
floors are the bytes one step must read (AR: the AR-view weights + the allocated KV cache;
Orthrus cycle: those plus the diffusion-view weights) / bandwidth. Random weights accept almost no
drafts, so Orthrus tokens/s here says nothing; ms per cycle vs AR ms per step gives the
break-even acceptance length (cycle / step - 1) and the projected speedup at an acceptance length
AL: (AL + 1) * step / cycle, shown at several AL (PROJECTED_AL: measured by others, not here).
EOS is disabled so every row runs the full --new-tokens. The JSON also records the device kind,
jax/jaxlib, CUDA runtime and driver versions where available, and the device's peak memory.
--layers stacked,unstacked times both layer weight layouts on the same weights: the [layers, ...]
arrays under a scan (what every CLI runs) and per-layer arrays in an unrolled loop
(orthrus_jax.params.unstack_layers), one record row each; the device peak is the process's
high-water mark so far (the unstacked row includes the stacked run and the split's transient
copy). Writes gpu-<stamp>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from infer import decoder
from orthrus_jax.cli import ArgumentParser, parse_dtype
from orthrus_jax.config import Qwen3Config
from orthrus_jax.params import (DIFF_KEYS, DIFF_SOURCE, count_params, init_params, param_shapes,
                                param_summary, unstack_layers)
from orthrus_jax.shapes import SHAPE_NAMES, shape_config

CPU_SHAPES = ("tiny",)
LAYER_LAYOUTS = ("stacked", "unstacked")  # [layers, ...] arrays under a scan; per-layer, unrolled
# Acceptance lengths (drafts accepted per cycle, bonus excluded) to project the speedup at; from
# the Orthrus method notes (paper tables and the vLLM PR). Only the first was measured end to end outside the paper.
PROJECTED_AL: dict[float, str] = {
    3.84: "vLLM PR 46007 (Qwen3-4B, MT-Bench, 1.66x measured)",
    6.0: "a middle value",
    6.9: "paper, MBPP",
    9.6: "paper, GSM8K",
    11.7: "paper, MATH-500 (the highest)",
}


def check_platform(shapes: Sequence[str]) -> None:
    platform = jax.devices()[0].platform
    if platform == "gpu" or all(s in CPU_SHAPES for s in shapes):
        return
    raise common.UsageError(f"no GPU (jax platform is {platform!r}); run it on a GPU machine, or "
                            f"use --shape tiny for the CPU smoke path")


def measure_bandwidth(nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """Device memory bandwidth from an elementwise copy of nbytes (bytes read + written / time)."""
    n = max(nbytes // 4, 1024)
    x = jnp.ones((n,), jnp.float32)  # a device buffer argument: nothing to constant-fold
    copy = jax.jit(lambda a: a * 1.0001)  # not elided by XLA: one full read and one full write
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        _, dt = common.timed(lambda: copy(x).block_until_ready())
        times.append(dt)
    del x
    best = min(times)
    return {"method": f"jax.jit(lambda a: a * 1.0001) over a float32 array of {4 * n} bytes "
                      f"on device 0; bandwidth = (bytes read + bytes written) / best of "
                      f"{repeats} wall times (block_until_ready), after one warm-up call",
            "bytes": 4 * n, "repeats": repeats, "best_s": best,
            "median_s": float(np.median(times)), "bandwidth_Bps": 2 * 4 * n / best,
            "median_bandwidth_Bps": 2 * 4 * n / float(np.median(times))}


def device_memory() -> dict[str, int] | None:
    """Device 0's memory counters (peak_bytes_in_use is the process's high-water mark so far);
    None where the backend keeps none (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - best effort
        return None
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
            if k in stats}


def step_bytes(cfg: Qwen3Config, dtype: Any, cache_len: int, batch: int) -> dict[str, int]:
    """Bytes one AR step and one Orthrus cycle must read from memory (weights + KV cache)."""
    shapes = param_shapes(cfg, dtype)
    item = jnp.dtype(dtype).itemsize
    layers = shapes["layers"]
    diff = sum(int(np.prod(layers[k].shape)) for k in DIFF_KEYS) * item
    ar_twins = sum(int(np.prod(layers[DIFF_SOURCE[k]].shape)) for k in DIFF_KEYS) * item
    shared_layers = sum(int(np.prod(v.shape)) for k, v in layers.items()
                        if k not in DIFF_KEYS) * item - ar_twins
    head = int(np.prod(shapes["lm_head" if "lm_head" in shapes else "embed"].shape)) * item
    ar_weights = shared_layers + ar_twins + head  # embedding rows of the inputs: negligible
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * item
    return {"ar_weights": ar_weights, "diff_twins": diff, "kv_cache": kv,
            "ar_step": ar_weights + kv,
            # diffusion pass: shared layers + diff twins + head + cache; verify pass: an AR step
            "orthrus_cycle": (shared_layers + diff + head + kv) + (ar_weights + kv),
            "total_params": count_params(shapes) * item}


def time_mode(params, cfg: Qwen3Config, mode: str, prompts: list[list[int]], new_tokens: int,
              block_size: int, repeats: int) -> dict[str, Any]:
    """One untimed run (compile), then `repeats` timed runs; ms per loop iteration (prefill
    excluded): the best is ms_per_step, the median and every sample are kept too."""
    kw = dict(mode=mode, max_new_tokens=new_tokens, batch_size=len(prompts),
              block_size=block_size, eos_token_ids=())
    _, warm_s = common.timed(lambda: decoder.generate(params, cfg, prompts, **kw))
    samples = []
    for _ in range(max(repeats, 1)):
        res = decoder.generate(params, cfg, prompts, **kw)
        st = res[0].stats  # one batch: every row has the batch's wall clock
        steps = max(r.stats.cycles for r in res)
        loop_s = st.time_s - st.ttft_s
        samples.append({"ttft_s": st.ttft_s, "loop_s": loop_s, "time_s": st.time_s,
                        "steps": steps, "ms_per_step": 1e3 * loop_s / max(steps, 1)})
    s = decoder.summarize(res)  # greedy, fixed prompts: the same tokens every run
    ms = [x["ms_per_step"] for x in samples]
    best = samples[int(np.argmin(ms))]
    return {"mode": mode, "warmup_s": warm_s, "repeats": len(samples),
            "ms_per_step": best["ms_per_step"], "ms_per_step_median": float(np.median(ms)),
            "ttft_s": best["ttft_s"],
            "ttft_s_median": float(np.median([x["ttft_s"] for x in samples])),
            "loop_s": best["loop_s"], "steps": best["steps"], "samples": samples,
            "tokens": s["tokens"], "tokens_per_s": s["tokens"] / best["time_s"],
            "tpf": s["tpf"], "acceptance_length": s["acceptance_length"],
            # what was decoded (greedy: layouts and runs must agree), without the ids themselves
            "token_ids_sha256": hashlib.sha256(
                json.dumps([r.token_ids for r in res]).encode()).hexdigest()}


def bench_shape(name: str, args: argparse.Namespace, bw: float) -> list[dict[str, Any]]:
    """One record per layer layout (--layers) of shape `name`, on the same random weights."""
    cfg = shape_config(name)
    dtype = jnp.dtype(args.dtype)
    init = jax.jit(functools.partial(init_params, cfg, dtype=dtype))
    params = init(jax.random.PRNGKey(args.seed))
    jax.block_until_ready(params)
    print(f"{name}: random weights, {param_summary(cfg)}", flush=True)
    recs = []
    for layout in args.layers:
        if layout == "unstacked":
            params = unstack_layers(params)  # the stacked arrays go with the old tree
        recs.append(bench_layout(name, cfg, params, layout, args, bw))
    del params  # the next shape's weights need the memory
    return recs


def bench_layout(name: str, cfg: Qwen3Config, params: Any, layout: str,
                 args: argparse.Namespace, bw: float) -> dict[str, Any]:
    k = int(args.block_size or cfg.block_size)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, cfg.vocab_size - 1, args.prompt_len).tolist()
               for _ in range(args.batch_size)]
    spec = decoder.make_spec(cfg, mode="orthrus", max_new_tokens=args.new_tokens, block_size=k)
    cache_len = spec.cache_len(decoder.length_bucket(args.prompt_len))
    nbytes = step_bytes(cfg, dtype, cache_len, args.batch_size)
    ar = time_mode(params, cfg, "ar", prompts, args.new_tokens, k, args.repeats)
    orth = time_mode(params, cfg, "orthrus", prompts, args.new_tokens, k, args.repeats)
    mem = device_memory()
    ar_floor = 1e3 * nbytes["ar_step"] / bw
    cyc_floor = 1e3 * nbytes["orthrus_cycle"] / bw
    ratio = orth["ms_per_step"] / ar["ms_per_step"]
    rec = {"shape": name, "layer_layout": layout, "config": dataclasses.asdict(cfg),
           "params": param_summary(cfg), "block_size": k,
           "dtype": dtype.name, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "cache_len": cache_len, "bytes": nbytes,
           "ar": ar, "orthrus": orth,
           "ar_floor_ms": ar_floor, "ar_over_floor": ar["ms_per_step"] / ar_floor,
           "cycle_floor_ms": cyc_floor, "cycle_over_floor": orth["ms_per_step"] / cyc_floor,
           "cycle_over_ar_step": ratio, "break_even_acceptance_length": ratio - 1.0,
           "projected_speedup": {str(al): (al + 1.0) / ratio for al in PROJECTED_AL},
           "device_memory": mem}
    print(f"{name:11s} {layout:9s} AR {ar['ms_per_step']:.3f} ms/token (floor {ar_floor:.3f} ms, "
          f"x{rec['ar_over_floor']:.2f}); Orthrus {orth['ms_per_step']:.3f} ms/cycle (floor "
          f"{cyc_floor:.3f} ms, x{rec['cycle_over_floor']:.2f}); cycle/step {ratio:.2f}, "
          f"break-even AL {ratio - 1:.2f}", flush=True)
    return rec


def markdown(record: dict[str, Any]) -> str:
    a = record["args"]
    bw = record["bandwidth"]
    lines = [common.md_preamble("GPU decode: ms per token vs the weight-streaming floor", record),
             f"- random weights ({a['dtype']}), batch {a['batch_size']}, prompt {a['prompt_len']} "
             f"random tokens, {a['new_tokens']} new tokens (EOS off); per mode one compile run, "
             f"then best (and median) of {a['repeats']} timed runs",
             f"- measured bandwidth: {bw['bandwidth_Bps'] / 1e9:.1f} GB/s best, "
             f"{bw['median_bandwidth_Bps'] / 1e9:.1f} GB/s median ({bw['method']})",
             "- floor = bytes a step must read (weights of the view(s) + the allocated KV cache) / "
             "bandwidth; Orthrus cycle = diffusion pass + verify pass of K tokens\n"]
    rows = []
    for r in record["shapes"]:
        mem = r.get("device_memory") or {}
        rows.append([r["shape"], r.get("layer_layout", "stacked"),
                     r["bytes"]["ar_weights"] / 1e9, r["ar"]["ms_per_step"],
                     r["ar"]["ms_per_step_median"], r["ar_floor_ms"], r["ar_over_floor"],
                     r["orthrus"]["ms_per_step"], r["orthrus"]["ms_per_step_median"],
                     r["cycle_floor_ms"], r["cycle_over_ar_step"],
                     r["break_even_acceptance_length"], r["ar"]["ttft_s"] * 1e3,
                     mem["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in mem else None])
    lines.append(common.md_table(
        ["shape", "layers", "AR weights GB", "AR ms/token", "(median)", "floor ms", "AR/floor",
         "Orthrus ms/cycle", "(median)", "cycle floor ms", "cycle / AR step", "break-even AL",
         "prefill ms", "device peak GB"], rows))
    lines.append("\n## Projected speedup over AR = (AL + 1) x AR step / cycle\n")
    lines.append("At acceptance lengths AL (drafts accepted per cycle, bonus excluded) measured "
                 "elsewhere; random weights accept nothing here, so these are projections from "
                 "the measured step and cycle times, not measurements.\n")
    lines.append(common.md_table(
        ["shape", "layers", *[f"AL {al:g}: {src}" for al, src in PROJECTED_AL.items()]],
        [[r["shape"], r.get("layer_layout", "stacked"),
          *[f"{r['projected_speedup'][str(al)]:.2f}x" for al in PROJECTED_AL]]
         for r in record["shapes"]]))
    return "\n".join(lines) + "\n"


def plot(path: str, record: dict[str, Any]) -> None:
    shapes = record["shapes"]
    common.bar_chart(
        path, [f"{r['shape']} {r.get('layer_layout', 'stacked')}" for r in shapes],
        {"AR ms/token": [r["ar"]["ms_per_step"] for r in shapes],
         "AR floor": [r["ar_floor_ms"] for r in shapes],
         "Orthrus ms/cycle": [r["orthrus"]["ms_per_step"] for r in shapes],
         "cycle floor": [r["cycle_floor_ms"] for r in shapes]},
        xlabel="shape", ylabel="ms", log=True,
        title=(f"decode step vs weight-streaming floor, batch {record['args']['batch_size']}, "
               f"{record['args']['dtype']}\n{common.device_label(record['machine'])}, "
               f"{record['date'][:10]}"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPE_NAMES]
    if unknown:
        raise common.UsageError(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPE_NAMES)}")
    if args.repeats < 1:
        raise common.UsageError(f"--repeats {args.repeats}: give N >= 1")
    args.layers = [x.strip() for x in str(args.layers).split(",") if x.strip()]
    if not args.layers or any(x not in LAYER_LAYOUTS for x in args.layers) \
            or args.layers != sorted(set(args.layers), key=LAYER_LAYOUTS.index):
        raise common.UsageError(f"--layers {','.join(args.layers)!r}: one or both of "
                                f"{','.join(LAYER_LAYOUTS)}, in that order")
    check_platform(shapes)
    record = common.header("gpu", args)
    nbytes = args.bw_mib * 2**20 if args.bw_mib else (
        4 * 2**30 if jax.devices()[0].platform == "gpu" else 64 * 2**20)
    bw = measure_bandwidth(nbytes)
    print(f"bandwidth {bw['bandwidth_Bps'] / 1e9:.1f} GB/s ({bw['bytes'] / 2**20:.0f} MiB copy)",
          flush=True)
    record["bandwidth"] = bw
    record["projected_al"] = {str(al): src for al, src in PROJECTED_AL.items()}
    record["shapes"] = [rec for s in shapes for rec in bench_shape(s, args, bw["bandwidth_Bps"])]
    files = common.write_record(args.out_dir, "gpu", record, markdown,
                                chart=lambda path: plot(path, record))
    print(f"wrote {', '.join(files.values())}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-1.7b,qwen3-8b",
                   help=f"comma-separated, from {', '.join(SHAPE_NAMES)}; only 'tiny' runs without a GPU")
    p.add_argument("--dtype", default="bfloat16", type=parse_dtype,
                   help="bf16 (default), fp32 or fp16 (float32, bfloat16, float16 accepted)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="K (default: the shape's)")
    p.add_argument("--bw-mib", type=int, default=0,
                   help="size of the bandwidth copy in MiB (default 4096 on GPU, 64 otherwise)")
    p.add_argument("--layers", default="stacked",
                   help="layer weight layouts to time, stacked and/or unstacked (per-layer arrays, "
                        "an unrolled loop: orthrus_jax.params.unstack_layers), in that order")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per mode after the compile run (best and median recorded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
