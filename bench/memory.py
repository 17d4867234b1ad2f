"""Compile-time per-device memory of generation's programs at a real Qwen3 shape.

    python -m bench.memory --shape qwen3-8b --prompt-len 32768 [--batch 1] [--dtype fp32|bf16]
        [--max-new-tokens 256] [--block-size 32] [--program decoder|make-data]
        [--tensor-parallel-size N] [--data-parallel-size N] [--json] [--record]

Weights, cache and state are abstract (jax.ShapeDtypeStruct, with their shardings on a mesh):
nothing is allocated. Each program is lowered and compiled for the platform this runs on, and
XLA's memory analysis gives, per device, its arguments, outputs, aliased (donated) bytes and
temporaries; `peak_bytes` = arguments + outputs - aliased + temporaries.

--program decoder (default): infer.decoder's prefill (the prompt, in chunks of 512 tokens, into
a donated empty cache; first token sampled) and one Orthrus cycle (draft + verify) of the batch.
The KV cache is a donated argument and output of both, never a temporary.
`prefill_temp_bytes` is the largest temporary memory of any program prefill runs.

--program make-data: train.make_data's decode, infer.engine in AR mode with --batch slots
(greedy): the insert program (one prefill chunk of a prompt into its slot) and the generate
program (up to `steps` AR tokens of every slot); the slot cache holds --prompt-len +
--max-new-tokens positions per slot (length-bucketed) and is a donated argument and output.

On the CPU, --tensor-parallel-size x --data-parallel-size > 1 runs on that many fake host
devices (the figures are per device of the mesh). `--json` prints one JSON object; `--record`
writes bench/results/memory-STAMP.{json,md} with a PASS/MISS check of the largest program's
peak against --device-gib (default 80).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from bench import common
from orthrus_jax.cli import parse_dtype
from orthrus_jax.config import ConfigError, Qwen3Config
from orthrus_jax.params import param_shapes
from orthrus_jax.shapes import SHAPE_NAMES, shape_config

GIB = 1024 ** 3
PROGRAMS = ("decoder", "make-data")
# XLA's CPU compiler runs bf16/fp16 matmuls in fp32 and, through loop-invariant code motion,
# converts the whole stacked [layers, ...] weights to fp32 once, before the layer loop: a CPU
# artifact of twice the 16-bit weights in temporaries (GPU and TPU multiply in 16 bits). On the
# CPU, 16-bit programs compile without that pass: the conversion stays in the loop, one layer's
# weights at a time (still counted: an upper bound of the CPU artifact).
CPU_16BIT_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options(dtype: Any) -> dict[str, str]:
    """Options for measuring dtype's programs on this platform (see CPU_16BIT_OPTIONS)."""
    if jax.default_backend() == "cpu" and jnp.dtype(dtype).itemsize < 4:
        return dict(CPU_16BIT_OPTIONS)
    return {}


def _stats(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    s = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes)}
    s["peak_bytes"] = s["argument_bytes"] + s["output_bytes"] - s["alias_bytes"] + s["temp_bytes"]
    return s


def _abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of tree, with the given shardings (a matching tree) if any."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _put(mesh: Any, tree: Any, spec_of=lambda shape: P()) -> Any:
    """Abstract arrays on the mesh (spec_of(shape) per leaf), or plain ones without a mesh."""
    if mesh is None:
        return _abstract(tree)
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=NamedSharding(mesh, spec_of(a.shape))), tree)


def abstract_params(cfg: Qwen3Config, dtype: Any, mesh: Any) -> Any:
    """Every weight (twins included) as ShapeDtypeStructs, sharded by the inference rules."""
    from orthrus_jax import sharding as shd

    shapes = param_shapes(cfg, dtype)
    if mesh is None:
        return shapes
    return _abstract(shapes, shd.inference_param_shardings(cfg, shapes, mesh))


def decoder_programs(cfg: Qwen3Config, prompt_len: int, batch: int, dtype: Any, *,
                     max_new_tokens: int, block_size: int | None, mesh: Any) -> dict[str, Any]:
    """infer.decoder's prefill and one cycle, compiled on abstract arguments: name -> Compiled."""
    from infer import decoder
    from orthrus_jax import sharding as shd

    spec = decoder.make_spec(cfg, mode="orthrus", max_new_tokens=max_new_tokens,
                             block_size=block_size, mesh=mesh)
    params = abstract_params(cfg, dtype, mesh)
    bucket = decoder.length_bucket(prompt_len)
    rows = lambda shape: shd.row_spec(mesh, shape)  # noqa: E731
    tokens, lens, limits = _put(mesh, (jax.ShapeDtypeStruct((batch, bucket), jnp.int32),
                                       jax.ShapeDtypeStruct((batch,), jnp.int32),
                                       jax.ShapeDtypeStruct((batch,), jnp.int32)), rows)
    sampling, key = _put(mesh, (decoder.Sampling.make(0.0, 1.0),
                                jax.ShapeDtypeStruct((2,), jnp.uint32)))
    cache = jax.eval_shape(lambda: decoder.empty_cache(spec, batch, bucket, dtype))
    if mesh is not None:  # the donated empty cache, rows over data and KV heads over tensor
        kv, ln = (NamedSharding(mesh, s) for s in shd.cache_specs(cfg, mesh, batch))
        cache = _abstract(cache, type(cache)(k=kv, v=kv, length=ln))
    opts = compiler_options(dtype)
    prefill = decoder.prefill_jit.lower(params, spec, cache, tokens, lens, limits, sampling,
                                        key).compile(opts)
    shapes = jax.eval_shape(lambda *a: decoder.prefill_fn(a[0], spec, *a[1:]),
                            params, cache, tokens, lens, limits, sampling, key)
    state = _abstract(shapes, prefill.output_shardings if mesh is not None else None)
    cycle = decoder.step_jit.lower(params, spec, state, sampling).compile(opts)
    return {"prefill": prefill, "cycle": cycle}


def make_data_programs(cfg: Qwen3Config, prompt_len: int, batch: int, dtype: Any, *,
                       max_new_tokens: int, mesh: Any) -> dict[str, Any]:
    """infer.engine's programs as train.make_data runs them (AR, greedy, `batch` slots of
    prompt_len + max_new_tokens positions, length-bucketed as make_data does), compiled on
    abstract arguments: name -> Compiled."""
    from infer import decoder, engine

    max_len = min(decoder.length_bucket(prompt_len + max_new_tokens),
                  cfg.max_position_embeddings)
    # the Engine's AR settings: 16 cycles per generate call, prefill chunks of up to 256 tokens
    spec = engine.EngineSpec(cfg=cfg, mode="ar", block_size=cfg.block_size, slots=batch,
                             max_len=max_len, steps=16, chunk=256,
                             eos_ids=tuple(cfg.eos_token_ids), mesh=mesh)
    params = abstract_params(cfg, dtype, mesh)
    state = jax.eval_shape(lambda: engine.init_state_fn(spec, jnp.dtype(dtype)))
    if mesh is not None:
        state = _abstract(state, engine.state_shardings(spec, state))
    width = min(engine.chunk_width(prompt_len), spec.chunk)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    req = {"max_new": i32, "temperature": f32, "top_p": f32, "top_k": i32,
           "key": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    args = _put(mesh, (jax.ShapeDtypeStruct((1, width), jnp.int32), i32, i32, i32,
                       jax.ShapeDtypeStruct((), jnp.bool_), req))
    opts = compiler_options(dtype)
    insert = engine.insert_jit.lower(params, spec, state, *args).compile(opts)
    generate = engine.generate_jit.lower(params, spec, state, _put(mesh, i32)).compile(opts)
    return {"insert": insert, "generate": generate}


def _mesh(cfg: Qwen3Config, tensor: int, data: int) -> Any:
    if tensor * data == 1:
        return None
    from orthrus_jax import sharding as shd

    try:
        return shd.inference_mesh(cfg, tensor, data)
    except ConfigError as err:
        raise common.UsageError(str(err)) from None


def measure(shape: str, prompt_len: int, batch: int = 1, dtype: str = "fp32",
            max_new_tokens: int = 256, block_size: int | None = None, program: str = "decoder",
            tensor: int = 1, data: int = 1) -> dict[str, Any]:
    """Per-program memory (bytes, per device) and the summary figures."""
    cfg = shape_config(shape)
    dt = jnp.dtype(parse_dtype(dtype))
    if prompt_len + max_new_tokens > cfg.max_position_embeddings:
        raise common.UsageError(
            f"--prompt-len {prompt_len} + --max-new-tokens {max_new_tokens} exceeds {shape}'s "
            f"max_position_embeddings {cfg.max_position_embeddings}")
    if batch % data:
        raise common.UsageError(f"--batch {batch} must be a multiple of --data-parallel-size "
                                f"{data}")
    mesh = _mesh(cfg, tensor, data)
    if program == "decoder":
        compiled = decoder_programs(cfg, prompt_len, batch, dt, max_new_tokens=max_new_tokens,
                                    block_size=block_size, mesh=mesh)
    else:
        compiled = make_data_programs(cfg, prompt_len, batch, dt, max_new_tokens=max_new_tokens,
                                      mesh=mesh)
    per = {name: _stats(c) for name, c in compiled.items()}
    res = {"shape": shape, "program": program, "prompt_len": prompt_len, "batch": batch,
           "dtype": dt.name, "max_new_tokens": max_new_tokens, "tensor_parallel_size": tensor,
           "data_parallel_size": data, "devices": tensor * data,
           "platform": jax.default_backend(), "compiler_options": compiler_options(dt),
           "programs": per,
           "peak_bytes": max(s["peak_bytes"] for s in per.values())}
    if program == "decoder":
        res["prefill_temp_bytes"] = per["prefill"]["temp_bytes"]
        res["cycle_temp_bytes"] = per["cycle"]["temp_bytes"]
        res["kv_cache_bytes"] = per["cycle"]["alias_bytes"]  # the donated state, cache included
    else:
        res["insert_temp_bytes"] = per["insert"]["temp_bytes"]
        res["generate_temp_bytes"] = per["generate"]["temp_bytes"]
        res["kv_cache_bytes"] = per["generate"]["alias_bytes"]
    return res


def fit_target(res: dict[str, Any], device_gib: float) -> dict[str, Any]:
    """PASS when the largest program's per-device peak fits device_gib (a reported check)."""
    peak = res["peak_bytes"] / GIB
    return common.target(f"{res['shape']} {res['program']} fits {device_gib:g} GiB per device",
                         device_gib - peak, 0.0,
                         f"value = headroom in GiB; peak {peak:.2f} GiB per device of "
                         f"{res['devices']}")


def markdown(record: dict[str, Any]) -> str:
    rows = []
    for r in record["runs"]:
        for name, s in r["programs"].items():
            rows.append([r["shape"], r["prompt_len"], r["batch"], r["dtype"],
                         f"tp{r['tensor_parallel_size']} dp{r['data_parallel_size']}", name,
                         s["argument_bytes"] / GIB, s["output_bytes"] / GIB,
                         s["alias_bytes"] / GIB, s["temp_bytes"] / GIB, s["peak_bytes"] / GIB])
    table = common.md_table(["shape", "prompt", "batch", "dtype", "mesh", "program",
                             "arguments GiB", "outputs GiB", "aliased GiB", "temporaries GiB",
                             "peak GiB"], rows)
    checks = "\n".join(f"- [{t['status']}] {t['target']}: {t['detail']}"
                       for t in record.get("targets", []))
    return (common.md_preamble("Generation memory (compile-time, per device)", record)
            + "\nPer device of the mesh; abstract weights (nothing allocated); peak = arguments "
              "+ outputs - aliased + temporaries.\n\n" + table + "\n\n" + checks + "\n")


def _use_fake_devices(n: int) -> None:
    """On the CPU, n host devices for a mesh (before the backend starts; a no-op once it has,
    or when XLA_FLAGS already forces a count)."""
    if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", max(n, 8))
    except RuntimeError:
        pass


def build_parser() -> argparse.ArgumentParser:
    from orthrus_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m bench.memory", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=SHAPE_NAMES)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--batch", type=int, default=1, help="rows (decoder) or slots (make-data)")
    p.add_argument("--dtype", type=parse_dtype, default="float32",
                   help="weights and KV cache: fp32 (default), bf16 or fp16")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None, help="K (decoder; default 32)")
    p.add_argument("--program", choices=PROGRAMS, default="decoder",
                   help="decoder: prefill and one Orthrus cycle (default); make-data: "
                        "train.make_data's decode (the engine, AR, --batch slots)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N")
    p.add_argument("--device-gib", type=float, default=80.0,
                   help="per-device memory the record checks the peak against (default 80)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--record", action="store_true",
                   help="write bench/results/memory-STAMP.{json,md}")
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv=None) -> int:
    p = build_parser()

    def run(args):
        for flag in ("prompt_len", "batch", "max_new_tokens", "tensor_parallel_size",
                     "data_parallel_size"):
            if getattr(args, flag) < 1:
                raise common.UsageError(f"--{flag.replace('_', '-')} must be >= 1")
        _use_fake_devices(args.tensor_parallel_size * args.data_parallel_size)
        res = measure(args.shape, args.prompt_len, args.batch, args.dtype, args.max_new_tokens,
                      args.block_size, args.program, args.tensor_parallel_size,
                      args.data_parallel_size)
        target = fit_target(res, args.device_gib)
        if args.json:
            print(json.dumps(res))
        else:
            for name, s in res["programs"].items():
                print(f"{name:9s} " + "  ".join(f"{k[:-6]} {v / GIB:8.3f} GiB"
                                                for k, v in s.items()))
            common.print_targets([target])
        if args.record:
            record = {**common.header("memory", args), "runs": [res], "targets": [target]}
            files = common.write_record(args.out_dir, "memory", record, markdown)
            if not args.json:
                print("record:", common.repo_relative(files["markdown"]))
        return 0

    return common.run_main(p, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
