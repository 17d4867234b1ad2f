"""Chain vs tree verification: acceptance length, TPF and tokens/s per tree budget.

    python -m bench.tree --model checkpoints/demo --num-prompts 40 --max-new-tokens 128 \
        --budgets 8,16,32,64 --settings greedy,sampled

For each setting (greedy; sampled at --temperature/--top-k/--top-p) the same token-id prompts
run through `infer.decoder.generate` with verify="chain" (K-1 drafts) and verify="tree" at each
budget (draft nodes per cycle besides the anchor). Each config is warmed up on one batch (all
batches share one compiled shape: prompts padded to one length bucket), then timed over the whole
prompt set. AL = accepted drafts per cycle (bonus excluded), TPF = tokens / (1 + 2 cycles),
tokens/s = new tokens / wall time (prefill included, compile excluded). Greedy tree outputs are
compared token for token with the chain's. Writes tree-<stamp>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import jax.numpy as jnp

from bench import common
from bench.decode import find_tokenizer, load_prompts
from infer import decoder
from orthrus_jax import paths
from orthrus_jax.checkpoint import load_any_model
from orthrus_jax.cli import ArgumentParser, parse_dtype

SETTINGS = ("greedy", "sampled")


def _configs(budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    return [("chain", None)] + [("tree", b) for b in budgets]


def _label(verify: str, budget: int | None, k: int) -> str:
    return f"chain ({k - 1})" if verify == "chain" else f"tree@{budget}"


def run_config(params, cfg, prompts, *, verify: str, budget: int | None, setting: str,
               args) -> tuple[list[list[int]], dict[str, Any]]:
    sampling = (dict(temperature=0.0) if setting == "greedy" else
                dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed))
    pad = max(len(p) for p in prompts)

    def call(ps):
        return decoder.generate(params, cfg, ps, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, block_size=args.block_size,
                                pad_to=pad, verify=verify, tree_budget=budget, **sampling)

    _, warm = common.timed(lambda: call(prompts[: args.batch_size]))
    res, best = common.best_of(lambda: call(prompts), args.repeats)
    s = decoder.summarize(res)
    tokens = s["tokens"]
    rec = {"setting": setting, "verify": verify, "budget": budget, "tokens": tokens,
           "time_s": best, "tokens_per_s": tokens / best, "warmup_s": warm,
           "cycles": s["cycles"], "tpf": s["tpf"], "acceptance_length": s["acceptance_length"],
           "nodes_per_cycle": s["nodes_per_cycle"],
           "position_acceptance": [round(x, 4) for x in s["position_acceptance"]],
           "acceptance_hist": s["acceptance_hist"]}
    return [r.token_ids for r in res], rec


def markdown(record: dict[str, Any]) -> str:
    a = record["args"]
    lines = [common.md_preamble("Tree verification: chain vs tree by budget", record),
             f"- model `{a['model']}`, {a['num_prompts']} prompts from `{a['prompts']}` (last <= "
             f"{a['max_prompt_tokens']} tokens), max_new_tokens {a['max_new_tokens']}, batch "
             f"{a['batch_size']}, K = {record['block_size']}; sampled: temperature "
             f"{a['temperature']}, top_k {a['top_k']}, top_p {a['top_p']}",
             "- AL = accepted drafts per cycle (bonus excluded); TPF = tokens / (1 + 2 cycles); "
             "nodes = draft tokens verified per cycle besides the anchor; tokens/s on this CPU "
             "(the micro model is compute-bound here: a tree of N nodes costs a verify pass of "
             "N+1 tokens, like a chain of N+1)\n"]
    rows = []
    for r in record["runs"]:
        chain = record["chain_al"][r["setting"]]
        rows.append([r["setting"], r["label"], r["acceptance_length"],
                     r["acceptance_length"] / chain if chain else None, r["tpf"],
                     r["nodes_per_cycle"], r["tokens_per_s"],
                     ", ".join(f"{x:.2f}" for x in r["position_acceptance"][:6]),
                     r.get("matches_chain", "n/a")])
    lines.append(common.md_table(["setting", "config", "AL", "AL / chain", "TPF", "nodes/cycle",
                                  "tokens/s", "acceptance at depth 1..6", "greedy == chain"],
                                 rows))
    lines.append("\n## Targets\n")
    lines += [f"- **{t['status']}** {t['target']}: "
              + ("n/a" if t["value"] is None else f"{t['value']:.3g}")
              + ("" if t["threshold"] is None else f" (needs >= {t['threshold']:.3g})")
              + f"; {t['detail']}" for t in record["targets"]]
    return "\n".join(lines) + "\n"


def plot(path: str, record: dict[str, Any]) -> None:
    runs = record["runs"]
    labels = [r["label"] for r in runs if r["setting"] == record["settings"][0]]
    series = {}
    for st in record["settings"]:
        by = {r["label"]: r for r in runs if r["setting"] == st}
        series[f"AL, {st}"] = [by[l]["acceptance_length"] for l in labels]
        series[f"TPF, {st}"] = [by[l]["tpf"] for l in labels]
    common.bar_chart(path, labels, series, xlabel="verification (draft nodes per cycle)",
                     ylabel="accepted drafts per cycle / tokens per forward",
                     title=f"chain vs tree, {os.path.normpath(record['args']['model'])}, "
                           f"{common.device_label(record['machine'])}, {record['date'][:10]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        budgets = [int(b) for b in str(args.budgets).split(",") if b.strip()]
    except ValueError:
        raise common.UsageError(f"--budgets {args.budgets!r}: give comma-separated integers") \
            from None
    if not budgets or min(budgets) < 1:
        raise common.UsageError(f"--budgets {args.budgets!r}: budgets must be >= 1")
    settings = [s for s in str(args.settings).split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise common.UsageError(f"--settings {args.settings!r}: choose from {','.join(SETTINGS)}")
    record = common.header("tree", args)
    cfg, params = load_any_model(args.model, jnp.dtype(args.dtype))
    prompts = load_prompts(args.prompts, args.tokenizer or find_tokenizer(args.model),
                           args.num_prompts, args.max_prompt_tokens)
    k = int(args.block_size or cfg.block_size)
    record.update(block_size=k, settings=settings, budgets=budgets)
    runs, chain_al = [], {}
    for st in settings:
        chain_ids = None
        for verify, budget in _configs(budgets):
            ids, rec = run_config(params, cfg, prompts, verify=verify, budget=budget, setting=st,
                                  args=args)
            rec["label"] = _label(verify, budget, k)
            if verify == "chain":
                chain_ids, chain_al[st] = ids, rec["acceptance_length"]
            elif st == "greedy":
                rec["matches_chain"] = f"{sum(a == b for a, b in zip(ids, chain_ids))}/{len(ids)}"
            runs.append(rec)
            print(f"{st:8s} {rec['label']:11s} AL {rec['acceptance_length']:.3f} "
                  f"(x{rec['acceptance_length'] / max(chain_al[st], 1e-9):.2f} chain) "
                  f"TPF {rec['tpf']:.3f} nodes {rec['nodes_per_cycle']:.1f} "
                  f"{rec['tokens_per_s']:.1f} tok/s {rec.get('matches_chain', '')}", flush=True)
    record.update(runs=runs, chain_al=chain_al)
    greedy32 = next((r for r in runs if r["setting"] == "greedy" and r["budget"] == 32), None)
    record["targets"] = [common.target(
        "greedy AL at budget 32 >= 1.35 x chain AL",
        greedy32["acceptance_length"] / chain_al["greedy"] if greedy32 and chain_al.get("greedy")
        else None, 1.35, f"chain AL {chain_al.get('greedy', float('nan')):.3f}")]
    files = common.write_record(args.out_dir, "tree", record, markdown,
                                chart=lambda path: plot(path, record))
    common.print_targets(record["targets"])
    print(f"wrote {', '.join(files.values())}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.tree", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=paths.default_path(paths.DEMO_MODEL_DIR),
                   help="Orthrus model dir (params/), or an HF dir")
    p.add_argument("--prompts", default=paths.default_path(paths.DEV_PROMPTS))
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: from --model)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budgets", default="8,16,32,64", help="tree budgets (draft nodes per cycle)")
    p.add_argument("--settings", default="greedy,sampled", help="subset of greedy,sampled")
    p.add_argument("--temperature", type=float, default=1.0, help="sampled setting")
    p.add_argument("--top-k", type=int, default=20, help="sampled setting (0 = off)")
    p.add_argument("--top-p", type=float, default=0.8, help="sampled setting (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=None, help="K (default: the model's)")
    p.add_argument("--dtype", default="float32", type=parse_dtype,
                   help="compute dtype: fp32 (default), bf16 or fp16 (long names accepted too)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per config; best is kept")
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
