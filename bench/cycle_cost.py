"""Does a decode cycle's cost follow the live context or the cache size?

    python -m bench.cycle_cost [--model testbed/micro-qwen3] [--live 256] [--factor 16]

A prompt of --live tokens (random ids) is prefilled into two caches: one allocated for the live
context (live + K + 1 positions, room for one cycle's writes) and one --factor times larger.
From each post-prefill state, one Orthrus cycle (diffusion draft + AR verify) and one AR step are
timed (a fresh copy of the state per call, so the live length stays fixed; best of --repeats,
compile excluded). Target: the large cache's cycle costs at most 1.3x the small one's. Writes
cycle-cost-STAMP.{json,md}.
"""
from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from infer import decoder
from orthrus_jax import paths
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_any_model
from orthrus_jax.cli import ArgumentParser

TARGET_RATIO = 1.3


def post_prefill_state(params, spec, cfg, live: int, capacity: int):
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, live)).astype(np.int32)
    cache = init_cache(cfg, 1, capacity, params["embed"].dtype)
    n = jnp.asarray([live], jnp.int32)
    state = decoder.prefill_jit(params, spec, cache, jnp.asarray(tokens), n,
                                jnp.asarray([spec.max_new_tokens], jnp.int32),
                                decoder.Sampling.make(0.0, 1.0), jax.random.PRNGKey(0))
    return jax.block_until_ready(state)


def cycle_seconds(params, spec, state, repeats: int) -> float:
    sampling = decoder.Sampling.make(0.0, 1.0)

    def once():
        s = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, state))
        _, dt = common.timed(lambda: jax.block_until_ready(
            decoder.step_jit(params, spec, s, sampling)))
        return dt

    once()  # compile
    return min(once() for _ in range(repeats))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.live < 1 or args.factor < 1 or args.repeats < 1:
        raise common.UsageError("--live, --factor and --repeats must be >= 1")
    record = common.header("cycle-cost", args)
    cfg, params = load_any_model(args.model, jnp.float32)
    rows = []
    for mode in ("orthrus", "ar"):
        spec = decoder.make_spec(cfg, mode=mode, max_new_tokens=64, block_size=args.block_size)
        small = args.live + spec.k + 1
        big = args.live * args.factor
        times = {}
        for cap in (small, big):
            state = post_prefill_state(params, spec, cfg, args.live, cap)
            times[cap] = cycle_seconds(params, spec, state, args.repeats)
        rows.append({"mode": mode, "live": args.live, "small_cache": small, "big_cache": big,
                     "small_s": times[small], "big_s": times[big],
                     "ratio": times[big] / times[small]})
        print(f"{mode:8s} live {args.live}: cache {small} {times[small] * 1e3:.2f} ms, cache "
              f"{big} {times[big] * 1e3:.2f} ms, ratio {times[big] / times[small]:.3f}", flush=True)
    orth = rows[0]
    targets = [common.target(f"small-cache cycle / {args.factor}x-cache cycle >= "
                             f"{1 / TARGET_RATIO:.3g} (big <= {TARGET_RATIO}x small)",
                             1.0 / orth["ratio"], 1.0 / TARGET_RATIO, "Orthrus cycle, batch 1")]
    record.update(rows=rows, targets=targets)
    files = common.write_record(args.out_dir, "cycle-cost", record, markdown)
    common.print_targets(targets)
    print(f"wrote {', '.join(files.values())}")
    return record


def markdown(record: dict[str, Any]) -> str:
    a = record["args"]
    table = [[r["mode"], r["live"], r["small_cache"], r["small_s"] * 1e3, r["big_cache"],
              r["big_s"] * 1e3, r["ratio"]] for r in record["rows"]]
    lines = [common.md_preamble("Decode cycle cost: live context vs cache size", record),
             f"- model `{a['model']}`, batch 1, fp32; one cycle from the same post-prefill state "
             f"(best of {a['repeats']}, compile excluded)\n",
             common.md_table(["mode", "live tokens", "small cache", "ms", "big cache", "ms",
                              "big / small"], table), "\n## Targets\n"]
    lines += [f"- **{t['status']}** {t['target']}: {t['value']:.3g}; {t['detail']}"
              for t in record["targets"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    p = ArgumentParser(prog="python -m bench.cycle_cost", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=paths.default_path(paths.MICRO_MODEL_DIR))
    p.add_argument("--live", type=int, default=256, help="live context tokens (default 256)")
    p.add_argument("--factor", type=int, default=16, help="big cache = live x factor (default 16)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return common.run_main(p, run, argv)


if __name__ == "__main__":
    main()
