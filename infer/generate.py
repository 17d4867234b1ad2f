"""python -m infer.generate: Orthrus (or plain AR) generation from a model directory.

A thin entry point over infer.decoder.generate and infer.text; see README "Inference".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from orthrus_jax.cli import (
    ArgumentParser, add_parallel_arguments, add_prefill_chunk_argument, add_verify_arguments,
    check_parallel_arguments, default_compute_dtype, parse_dtype,
)


def default_model_dir() -> str:
    """The demo checkpoint of this clone (checkpoints/demo), or a one-line error."""
    from orthrus_jax import paths

    return paths.shipped(paths.DEMO_MODEL_DIR, "--model")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m infer.generate",
        description="Generate with Orthrus: the diffusion view drafts K tokens in one pass over the "
                    "shared KV cache, the AR view verifies them in a second pass (output equals AR "
                    "decoding: greedy exactly, sampling in distribution). --mode ar is the plain AR "
                    "baseline through the same cache and loop.")
    p.add_argument("--model", default=None,
                   help="model directory written by convert or train (config.json, tokenizer files, "
                        "params/); default: checkpoints/demo of this clone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (text)")
    src.add_argument("--prompts-file", help="JSONL file with a \"prompt\" field per line; run in "
                                            "batches of --batch-size")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the tokenizer's chat template "
                        "(rendered with jinja2 as transformers does); error if the model has none")
    p.add_argument("--system", default=None, help="with --chat: a system message (default: none)")
    p.add_argument("--enable-thinking", action="store_true",
                   help="with --chat: Qwen3's enable_thinking=True (default False: no thinking)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="new tokens per prompt, at most (EOS stops earlier); default 256")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples, with exact rejection sampling in "
                        "orthrus mode")
    p.add_argument("--top-k", type=int, default=20,
                   help="sampling: keep the k most likely tokens, 0 = off (default 20, as the "
                        "reference); applied to both views; ignored when greedy")
    p.add_argument("--top-p", type=float, default=0.8,
                   help="sampling: nucleus mass, 1 = off (default 0.8, as the reference); applied "
                        "to both views; ignored when greedy")
    p.add_argument("--seed", type=int, default=0,
                   help="PRNG seed for sampling: prompt i samples with seed + i, whichever slot it "
                        "runs in (default 0)")
    p.add_argument("--mode", choices=("orthrus", "ar"), default="orthrus",
                   help="orthrus: diffusion draft + AR verify (default); ar: one token per pass")
    add_verify_arguments(p)
    p.add_argument("--block-size", type=int, default=None,
                   help="K, tokens per draft block (anchor + K-1 drafts); default: the model's "
                        "block_size (32); 4, 8, 16 also work")
    p.add_argument("--batch-size", type=int, default=8,
                   help="slots: prompts decoded together on the continuous-batching engine (a "
                        "finished prompt's slot takes the next prompt at once); default 8")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache capacity in positions per slot: prompt + max-new-tokens must fit "
                        "(default: the longest prompt + max-new-tokens, rounded up to a length "
                        "bucket)")
    add_prefill_chunk_argument(p)
    p.add_argument("--dtype", type=parse_dtype, default=None,
                   help="compute precision of weights and KV cache: fp32, bf16 or fp16 (float32, "
                        "bfloat16, float16 accepted); default bf16 on GPU/TPU, fp32 on CPU")
    add_parallel_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt and line: prompt, text, token_ids (new "
                        "tokens only), stats (tokens, forward_passes, tpf, acceptance_length, "
                        "tokens_per_s, ttft_s); no streaming")
    p.add_argument("--no-stream", action="store_true",
                   help="print each completion when its batch ends, instead of streaming the text "
                        "of a single prompt as cycles commit")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.exists(args.prompts_file):
        raise FileNotFoundError(f"{args.prompts_file}: prompts file not found")
    prompts = []
    with open(args.prompts_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{args.prompts_file}:{n}: expected a JSON object with a "
                                 "\"prompt\" field") from None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{args.prompts_file}:{n}: field \"prompt\" must be a non-empty "
                                 f"string, got {prompt!r}")
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{args.prompts_file}: no prompts")
    return prompts


def stats_line(summary: dict, mode: str, ttft_s: float, wall_s: float) -> str:
    """The end-of-run stats line (also for --json runs, on stderr)."""
    parts = [f"mode={mode}", f"prompts={summary['prompts']}", f"tokens={summary['tokens']}",
             f"forward_passes={summary['forward_passes']}", f"tpf={summary['tpf']:.3f}"]
    if mode == "orthrus":
        parts.append(f"acceptance_length={summary['acceptance_length']:.3f}")
        parts.append(f"nodes_per_cycle={summary['nodes_per_cycle']:.1f}")
    tps = summary["tokens"] / wall_s if wall_s > 0 else 0.0
    parts += [f"ttft_s={ttft_s:.3f}", f"wall_s={wall_s:.2f}", f"tokens_per_s={tps:.1f}"]
    return "[stats] " + " ".join(parts) + " (acceptance: drafts per cycle, bonus excluded; " \
        "times include jit compilation)"


def run(args: argparse.Namespace) -> int:
    import time

    import jax
    import jax.numpy as jnp

    from infer import decoder, engine, text
    from orthrus_jax import sharding as shd
    from orthrus_jax.checkpoint import load_any_model
    from orthrus_jax.config import load_config

    shd.maybe_initialize_distributed(args.distributed)
    model_dir = args.model or default_model_dir()
    prompts = read_prompts(args)
    mesh = None
    if args.tensor_parallel_size * args.data_parallel_size > 1 or args.distributed:
        mesh = shd.inference_mesh(load_config(model_dir), args.tensor_parallel_size,
                                  args.data_parallel_size)
    cfg, params = load_any_model(model_dir, jnp.dtype(args.dtype or default_compute_dtype()),
                                 mesh, inference=True)
    tok = text.load_tokenizer(model_dir)
    rendered = ([text.chat_prompt(model_dir, p, system=args.system,
                                  enable_thinking=args.enable_thinking) for p in prompts]
                if args.chat else prompts)
    ids = [text.encode(tok, r) for r in rendered]
    lead = jax.process_index() == 0    # every host runs the program; the first one prints
    stream = (len(prompts) == 1 and not args.json and not args.no_stream and lead)
    on_tokens = None
    if stream:
        sd = text.StreamDecoder(tok)

        def on_tokens(_i: int, new: list[int]) -> None:
            sys.stdout.write(sd.push(new))
            sys.stdout.flush()

    t0 = time.perf_counter()
    kw = dict(mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, block_size=args.block_size,
              max_len=args.max_len, verify=args.verify, tree_budget=args.tree_budget,
              prefill_chunk_size=args.prefill_chunk_size, on_tokens=on_tokens)
    results = engine.generate_all(params, cfg, ids, slots=args.batch_size, mesh=mesh, **kw)
    total = time.perf_counter() - t0
    if not lead:
        return 0
    if stream:
        sys.stdout.write(sd.flush() + "\n")
    for prompt, r in zip(prompts, results):
        out = text.decode(tok, r.token_ids)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out, "token_ids": r.token_ids,
                              "stats": r.stats.short()}), flush=True)
        elif not stream:
            print(out, flush=True)
            if len(prompts) > 1:
                print("-" * 40, flush=True)
    ttft = min((r.stats.ttft_s for r in results if r.stats.tokens), default=0.0)
    print(stats_line(decoder.summarize(results), args.mode, ttft, total), file=sys.stderr,
          flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_parallel_arguments(parser, args)
    from orthrus_jax.config import ConfigError

    try:
        return run(args)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
