"""Decode throughput: HF transformers generate vs our AR mode vs Orthrus, per batch size.

    python -m bench.decode --model checkpoints/demo --hf-dir testbed/micro-qwen3 \
        --prompts testbed/prompts/prompts-dev.jsonl --num-prompts 64 --max-new-tokens 256 \
        --batch-sizes 1,4,8,16,32

One run times three engines on the same token-id prompts (raw text, no chat template), the same
max_new_tokens and EOS ids: the HF peer (`AutoModelForCausalLM.generate`, greedy unless
--temperature > 0, left-padded batches), `infer.decoder.generate(mode="ar")` and
`generate(mode="orthrus")`. Every (engine, batch size) is warmed up first on one batch per
compiled shape, then the whole prompt set is timed (best of --repeats); tokens/s = new tokens
(up to and including EOS) / wall seconds, prefill included, compile excluded. Greedy outputs are
compared token for token (Orthrus vs our AR vs HF). The HF peer runs on torch's default thread
count unless --torch-threads N; the count used and the load average at the start and the end of
the run are recorded (torch on a few shared cores is sensitive to other load). The HF peer runs
on --hf-device (default cpu; e.g. cuda, each timed call then synchronized). --num-prompts must
be at least the largest batch size. Writes decode-<stamp>.{json,md,png}.

    python -m bench.decode --context-lengths 256,1024,2048,3584 [--max-new-tokens 128]

instead times batch 1 per context length: ours (AR, Orthrus) TTFT and tokens/s beside HF's
prefill time for the same prompt (bench/decode_context.py; decode-context-<stamp>.*).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from bench import common
from infer import decoder
from orthrus_jax import paths
from orthrus_jax.checkpoint import load_any_model
from orthrus_jax.cli import (
    ArgumentParser, add_prefill_chunk_argument, add_verify_arguments, parse_dtype,
)

ENGINES = ("hf", "ar", "orthrus")
LABELS = {"hf": "HF transformers generate", "ar": "ours, AR mode", "orthrus": "ours, Orthrus"}


# ---------------------------------------------------------------------------------------------
# inputs


def load_prompts(path: str, tokenizer_file: str, num_prompts: int, max_prompt_tokens: int
                 ) -> list[list[int]]:
    """The first num_prompts "prompt" fields of a JSONL file, tokenized, keeping the last tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    out = []
    with open(path) as f:
        for line in f:
            if len(out) >= num_prompts:
                break
            if not line.strip():
                continue
            ids = tok.encode(json.loads(line)["prompt"], add_special_tokens=False).ids
            if ids:
                out.append(ids[-max_prompt_tokens:])
    if len(out) < num_prompts:
        raise common.UsageError(f"{path}: only {len(out)} non-empty prompts, --num-prompts "
                                f"{num_prompts} requested")
    return out


def find_tokenizer(*dirs: str) -> str:
    for d in dirs:
        p = os.path.join(d, "tokenizer.json")
        if os.path.exists(p):
            return p
    raise common.UsageError(f"no tokenizer.json in any of {dirs}; give --tokenizer")


# ---------------------------------------------------------------------------------------------
# engines


def check_hf_device(device: str, flag: str = "--hf-device"):
    """The HF peer's device as a torch.device that torch can allocate on (a one-line usage error
    naming `flag` otherwise: an unknown device string, no CUDA, an index out of range)."""
    import torch

    try:
        dev = torch.device(device)
        torch.zeros(1, device=dev)
    except Exception as err:  # noqa: BLE001 - RuntimeError, AssertionError (no CUDA build), ...
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise common.UsageError(f"{flag} {device!r}: torch cannot use it ({msg})") from None
    return dev


class HFPeer:
    """Batched HF generate over token-id prompts (left padding), on `device` (--hf-device)."""

    def __init__(self, hf_dir: str, dtype: str = "float32", threads: int | None = None,
                 device: str = "cpu"):
        """device: checked by the caller (check_hf_device, before any model loads)."""
        import torch
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device)
        self.model.eval()

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA kernels run asynchronously), so a timed call
        that ends with sync() measures the work itself; a no-op on CPU."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                 eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        torch = self.torch
        torch.manual_seed(seed)
        out: list[list[int] | None] = [None] * len(prompts)
        sample = temperature > 0
        kw = dict(do_sample=sample, max_new_tokens=max_new_tokens, min_new_tokens=0,
                  eos_token_id=list(eos_ids) or None, pad_token_id=pad_id,
                  temperature=temperature if sample else None,
                  top_k=(top_k or None) if sample else None,
                  top_p=top_p if sample and top_p < 1.0 else None)
        for idx in sorted_batches(prompts, batch_size):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids.to(self.device),
                                          attention_mask=mask.to(self.device), **kw)
            self.sync()
            for r, i in enumerate(idx):
                out[i] = truncate_at_eos(gen[r, width:].tolist(), eos_ids)
        return out  # type: ignore[return-value]


def sorted_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The decoder's batching: prompts sorted by length (stable), chunks of batch_size."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def truncate_at_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    eos = set(eos_ids)
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1]
    return ids


def warmup_sets(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """One batch per distinct compiled shape (length bucket, row bucket) the timed run will use."""
    seen, reps = set(), []
    for idx in sorted_batches(prompts, batch_size):
        key = (decoder.length_bucket(max(len(prompts[i]) for i in idx)),
               decoder.batch_bucket(len(idx), batch_size))
        if key not in seen:
            seen.add(key)
            reps.append(idx)
    return reps


def run_engine(engine: str, prompts, batch_size: int, *, args, cfg, params, hf: HFPeer | None,
               eos_ids: Sequence[int]) -> tuple[list[list[int]], dict[str, Any]]:
    """Warm up, then time the whole prompt set; (token ids per prompt, record)."""
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if engine == "hf":
        def call(ps):
            return hf.generate(ps, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                               eos_ids=eos_ids, pad_id=args.pad_id, **sampling), None
    else:
        def call(ps):
            tree = (dict(verify=args.verify, tree_budget=args.tree_budget)
                    if engine == "orthrus" else {})
            res = decoder.generate(params, cfg, ps, mode=engine, max_new_tokens=args.max_new_tokens,
                                   batch_size=batch_size, block_size=args.block_size,
                                   eos_token_ids=eos_ids,
                                   prefill_chunk_size=args.prefill_chunk_size, **sampling, **tree)
            return [r.token_ids for r in res], res

    warm_s = 0.0
    for idx in warmup_sets(prompts, batch_size):
        _, dt = common.timed(lambda: call([prompts[i] for i in idx]))
        warm_s += dt
    traces = dict(decoder.TRACE_COUNTS)
    (ids, res), best = common.best_of(lambda: call(prompts), args.repeats)
    retraced = engine != "hf" and dict(decoder.TRACE_COUNTS) != traces
    tokens = sum(len(x) for x in ids)
    rec: dict[str, Any] = {"engine": engine, "batch_size": batch_size, "prompts": len(prompts),
                           "tokens": tokens, "time_s": best, "tokens_per_s": tokens / best,
                           "warmup_s": warm_s, "retraced_in_timed_run": retraced}
    if res is not None:
        s = decoder.summarize(res)
        rec.update(tpf=s["tpf"], acceptance_length=s["acceptance_length"],
                   forward_passes=s["forward_passes"], cycles=s["cycles"])
        if engine == "orthrus":
            rec.update(acceptance_hist=s["acceptance_hist"], nodes_per_cycle=s["nodes_per_cycle"])
    else:  # HF: one forward pass per new token (the prefill yields the first one)
        rec.update(tpf=1.0, acceptance_length=None, forward_passes=tokens, cycles=None)
    return ids, rec


# ---------------------------------------------------------------------------------------------
# comparison and report


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(outputs: dict[str, list[list[int]]]) -> dict[str, Any]:
    """Per pair of engines: prompts whose greedy outputs are equal token for token (match / of,
    share = match / of) and the first mismatches."""
    pairs = [("orthrus", "ar"), ("ar", "hf"), ("orthrus", "hf"), ("ar", "ar_fp32")]
    out = {}
    for a, b in pairs:
        if a not in outputs or b not in outputs:
            continue
        div = [first_divergence(x, y) for x, y in zip(outputs[a], outputs[b])]
        bad = [(i, d) for i, d in enumerate(div) if d is not None]
        out[f"{a}=={b}"] = {"match": len(div) - len(bad), "of": len(div),
                            "share": (len(div) - len(bad)) / len(div) if div else None,
                            "mismatches": [{"prompt": i, "first_diff_at": d} for i, d in bad[:20]]}
    return out


def ratios(rows: dict[tuple[str, int], dict[str, Any]], batch_sizes: Sequence[int]
           ) -> dict[int, dict[str, float | None]]:
    def tps(engine, b):
        r = rows.get((engine, b))
        return r["tokens_per_s"] if r else None

    def div(x, y):
        return x / y if (x is not None and y) else None

    b1 = batch_sizes[0] if 1 not in batch_sizes else 1
    return {b: {"ar_over_hf": div(tps("ar", b), tps("hf", b)),
                "orthrus_over_ar": div(tps("orthrus", b), tps("ar", b)),
                "orthrus_over_hf": div(tps("orthrus", b), tps("hf", b)),
                "orthrus_over_orthrus_b1": div(tps("orthrus", b), tps("orthrus", b1)),
                "ar_over_ar_b1": div(tps("ar", b), tps("ar", b1))} for b in batch_sizes}


def check_targets(rows, rat, batch_sizes) -> list[dict[str, Any]]:
    t = []
    r1 = rat.get(1, {})
    t.append(common.target("our AR >= 5x HF generate tokens/s (batch 1)", r1.get("ar_over_hf"),
                           5.0, "micro model, this CPU"))
    orth, ar = rows.get(("orthrus", 1)), rows.get(("ar", 1))
    if orth and ar:
        need = 0.8 * orth["tpf"] * ar["tokens_per_s"]
        t.append(common.target("Orthrus tokens/s >= 0.8 x TPF x our AR tokens/s (batch 1)",
                               orth["tokens_per_s"], need,
                               f"TPF {orth['tpf']:.3g}, AR {ar['tokens_per_s']:.4g} tok/s"))
    else:
        t.append(common.target("Orthrus tokens/s >= 0.8 x TPF x our AR tokens/s (batch 1)", None,
                               None, "batch 1 not run"))
    t.append(common.target("Orthrus batch 8 >= 4x Orthrus batch 1 tokens/s",
                           rat.get(8, {}).get("orthrus_over_orthrus_b1") if 1 in rat else None,
                           4.0, "batch 1 and 8 both needed"))
    return t


def plot(path: str, rows, batch_sizes, engines, title: str) -> None:
    common.bar_chart(
        path, [str(b) for b in batch_sizes],
        {LABELS[e]: [rows[(e, b)]["tokens_per_s"] if (e, b) in rows else 0.0
                     for b in batch_sizes] for e in engines},
        xlabel="batch size", ylabel="tokens/s (new tokens, prefill included)", title=title,
        log=True)


def markdown(record: dict[str, Any]) -> str:
    a = record["args"]
    lines = [common.md_preamble("Decode benchmark: HF generate vs ours (AR) vs Orthrus", record),
             f"- model: `{a['model']}` (dtype {a['dtype']}), " + (
                 f"HF peer: `{a['hf_dir']}` on {record.get('hf_device', 'cpu')} "
                 f"(torch {record.get('torch', '?')}, "
                 f"{record.get('torch_threads', '?')} threads, "
                 f"{record.get('torch_threads_source', '?')})" if "torch" in record
                 else "HF peer: not run (--engines)"),
             f"- {a['num_prompts']} prompts from `{a['prompts']}` (last <= {a['max_prompt_tokens']}"
             f" tokens, mean {record['prompt_tokens_mean']:.0f}), max_new_tokens "
             f"{a['max_new_tokens']}, temperature {a['temperature']}, block size K = "
             f"{record['block_size']}, Orthrus verification: {a.get('verify', 'chain')}"
             + (f" (budget {a.get('tree_budget') or record['block_size'] - 1} nodes)"
                if a.get("verify") == "tree" else ""),
             "- tokens/s = new tokens / wall time of the whole prompt set (prefill included, "
             "compile excluded: each shape warmed up first); TPF = tokens / forward passes; AL = "
             "accepted drafts per cycle (bonus excluded)\n"]
    rows = {(r["engine"], r["batch_size"]): r for r in record["runs"]}
    table = []
    for b in record["batch_sizes"]:
        g = lambda e, k: rows[(e, b)][k] if (e, b) in rows else None  # noqa: E731
        rat = record["ratios"][str(b)]
        m = record["match"].get(str(b), {})
        ms = "; ".join(f"{k}: {v['match']}/{v['of']}" for k, v in m.items()) or "n/a"
        table.append([b, g("hf", "tokens_per_s"), g("ar", "tokens_per_s"),
                      g("orthrus", "tokens_per_s"), rat["ar_over_hf"], rat["orthrus_over_ar"],
                      rat["orthrus_over_orthrus_b1"], g("orthrus", "tpf"),
                      g("orthrus", "acceptance_length"), ms])
    lines.append(common.md_table(
        ["batch", "HF tok/s", "AR tok/s", "Orthrus tok/s", "AR/HF", "Orthrus/AR",
         "Orthrus b/b1", "Orthrus TPF", "Orthrus AL", "token-for-token match"], table))
    lines.append("\n## Targets\n")
    lines += [f"- **{t['status']}** {t['target']}: "
              + ("n/a" if t["value"] is None else f"{t['value']:.3g}")
              + ("" if t["threshold"] is None else f" (needs >= {t['threshold']:.3g})")
              + f"; {t['detail']}" for t in record["targets"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# driver


def positive_ints(flag: str, text: str, example: str) -> list[int]:
    """A flag's comma-separated integers, each >= 1 (a one-line usage error otherwise)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise common.UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. "
                                f"{example}") from None
    if not values or min(values) < 1:
        raise common.UsageError(f"{flag} {text!r}: sizes must be >= 1")
    return values


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.context_lengths:
        return run_context_lengths(args)
    batch_sizes = positive_ints("--batch-sizes", args.batch_sizes, "1,4,8")
    if args.num_prompts < max(batch_sizes):
        raise common.UsageError(
            f"--num-prompts {args.num_prompts} is smaller than the largest of --batch-sizes "
            f"{args.batch_sizes}: a batch would hold fewer rows than its label; give at least "
            f"{max(batch_sizes)} prompts or drop the larger sizes")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise common.UsageError(f"--torch-threads {args.torch_threads}: give N >= 1")
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    if "hf" in engines:
        check_hf_device(args.hf_device)  # a bad --hf-device fails before any model loads
    record = common.header("decode", args)  # machine, load average at the start
    cfg, params = load_any_model(args.model, jnp.dtype(args.dtype))
    eos_ids = tuple(cfg.eos_token_ids) if args.eos is None else tuple(
        int(e) for e in args.eos.split(",") if e.strip())
    if args.pad_id is None:
        args.pad_id = eos_ids[0] if eos_ids else 0
    prompts = load_prompts(args.prompts, args.tokenizer or find_tokenizer(args.model, args.hf_dir),
                           args.num_prompts, args.max_prompt_tokens)
    hf = (HFPeer(args.hf_dir, args.dtype, args.torch_threads, args.hf_device)
          if "hf" in engines else None)
    if hf is not None:
        import torch
        record.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                      hf_device=str(hf.device),
                      torch_threads_source="--torch-threads" if args.torch_threads
                      else "torch default")
        import transformers
        record["transformers"] = transformers.__version__
    record.update(batch_sizes=batch_sizes, engines=engines, eos_ids=list(eos_ids),
                  block_size=int(args.block_size or cfg.block_size),
                  prompt_tokens_mean=float(np.mean([len(p) for p in prompts])))
    runs, match = [], {}
    reference = None   # in a lower precision: our AR in fp32, untimed, the precision reference
    if args.dtype != "float32" and args.temperature == 0 and "ar" in engines:
        _, params32 = load_any_model(args.model, jnp.float32)
        reference = [r.token_ids for r in decoder.generate(
            params32, cfg, prompts, mode="ar", max_new_tokens=args.max_new_tokens,
            batch_size=max(batch_sizes), eos_token_ids=eos_ids,
            prefill_chunk_size=args.prefill_chunk_size)]
        del params32
    for b in batch_sizes:
        outputs = {} if reference is None else {"ar_fp32": reference}
        for e in engines:
            ids, rec = run_engine(e, prompts, b, args=args, cfg=cfg, params=params, hf=hf,
                                  eos_ids=eos_ids)
            outputs[e] = ids
            runs.append(rec)
            extra = (f", TPF {rec['tpf']:.3g}, AL {rec['acceptance_length']:.3g}"
                     if e == "orthrus" else "")
            print(f"batch {b:3d} {LABELS[e]:26s} {rec['tokens_per_s']:10.1f} tok/s "
                  f"({rec['tokens']} tokens in {rec['time_s']:.3f} s{extra})", flush=True)
        match[str(b)] = compare(outputs) if args.temperature == 0 else {}
    rows = {(r["engine"], r["batch_size"]): r for r in runs}
    rat = ratios(rows, batch_sizes)
    targets = check_targets(rows, rat, batch_sizes)
    all_match = (all(v["match"] == v["of"] for m in match.values() for v in m.values())
                 if args.temperature == 0 else None)
    record.update(runs=runs, ratios={str(b): r for b, r in rat.items()}, match=match,
                  all_outputs_match=all_match, targets=targets)
    title = (f"decode tokens/s, {os.path.normpath(args.model)}, "
             f"{common.device_label(record['machine'])}, {record['date'][:10]}")
    files = common.write_record(args.out_dir, "decode", record, markdown,
                                chart=lambda path: plot(path, rows, batch_sizes, engines, title))

    print("\nratios (tokens/s):")
    for b in batch_sizes:
        r = rat[b]
        print(f"  batch {b:3d}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in r.items() if v is not None))
    if all_match is not None:
        print(f"all greedy outputs match token for token: {all_match}")
        for b, mm in match.items():
            for k, v in mm.items():
                if v["match"] != v["of"]:
                    print(f"  batch {b} {k}: {v['match']}/{v['of']} match, first mismatches "
                          f"{v['mismatches'][:3]}")
    common.print_targets(targets)
    print(f"wrote {', '.join(files.values())}")
    return record


def run_context_lengths(args: argparse.Namespace) -> dict[str, Any]:
    from bench.decode_context import run_context

    lengths = positive_ints("--context-lengths", args.context_lengths, "256,1024")
    if "hf" in args.engines.split(","):
        check_hf_device(args.hf_device)  # a bad --hf-device fails before any model loads
    cfg, params = load_any_model(args.model, jnp.dtype(args.dtype))
    if max(lengths) + args.max_new_tokens > cfg.max_position_embeddings:
        raise common.UsageError(
            f"--context-lengths up to {max(lengths)} + --max-new-tokens {args.max_new_tokens} "
            f"exceed the model's max_position_embeddings {cfg.max_position_embeddings}")
    args.tokenizer_file = args.tokenizer or find_tokenizer(args.model, args.hf_dir)
    hf = (HFPeer(args.hf_dir, args.dtype, args.torch_threads, args.hf_device)
          if "hf" in args.engines.split(",") else None)
    return run_context(args, cfg, params, hf, lengths)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=paths.default_path(paths.DEMO_MODEL_DIR),
                   help="Orthrus model dir (params/), or an HF dir (diffusion twins = AR copies)")
    p.add_argument("--hf-dir", default=paths.default_path(paths.MICRO_MODEL_DIR),
                   help="HF model dir of the same backbone, for the transformers peer")
    p.add_argument("--prompts", default=paths.default_path(paths.DEV_PROMPTS),
                   help="JSONL with a \"prompt\" field per line")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: from --model/--hf-dir)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="keep the last N tokens of each prompt (default 512)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,4,8,16,32")
    p.add_argument("--engines", default="hf,ar,orthrus", help="subset of hf,ar,orthrus")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (outputs compared token for token); > 0 samples")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=None, help="K (default: the model's)")
    add_verify_arguments(p)
    p.add_argument("--dtype", default="float32", type=parse_dtype,
                   help="compute dtype for ours and HF: fp32 (default: exact matching), bf16 or "
                        "fp16 (float32, bfloat16, float16 accepted); below fp32 our AR is also "
                        "run in fp32 once and compared (ar==ar_fp32)")
    add_prefill_chunk_argument(p)
    p.add_argument("--context-lengths", default=None, metavar="L1,L2,...",
                   help="instead of the batch sweep: batch 1, one prompt of each length (dev "
                        "prompts joined); TTFT and tokens/s of ours (AR, Orthrus) beside HF's "
                        "prefill time (bench/decode_context.py)")
    p.add_argument("--eos", default=None, help="comma-separated EOS ids (default: model config)")
    p.add_argument("--pad-id", type=int, default=None, help="HF pad id (default: first EOS)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per config; best is kept")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads(N) for the HF peer (default: torch's own default; "
                        "the count used is recorded)")
    p.add_argument("--hf-device", default="cpu", metavar="DEVICE",
                   help="torch device of the HF peer: cpu (default), cuda, cuda:1, ...; CUDA "
                        "calls are synchronized before their timer stops. On one GPU shared "
                        "with JAX, set XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX otherwise takes "
                        "75%% of its memory at start)")
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
