"""Decode speed against context length at batch 1: ours (AR and Orthrus) beside HF's prefill.

    python -m bench.decode --context-lengths 256,1024,2048,3584 [--max-new-tokens 128]
        [--hf-device cuda]

Per context length L, one prompt of L tokens (the dev prompts joined, `infer.text.
joined_prompt_ids`) runs through `infer.decoder.generate` in AR and Orthrus mode (greedy, batch
1): decode tokens/s after the first token (from generate's stats) and tokens/s overall. Time to
first token (TTFT) is timed from outside, like HF's prefill: the wall time of
`generate(mode="ar", max_new_tokens=1)` for the prompt (the chunked prefill,
`--prefill-chunk-size`, plus our host-side setup). Beside them: HF transformers' prefill time for
the same prompt (one forward pass, on --hf-device). Every timed callable is warmed up once
(compile excluded), then all run in turns, --repeats rounds, each round starting one callable
further along (round r starts at callable r mod n), so drift in this machine's speed and any
run-order effect fall on all of them alike; each figure is the best of its rounds and every
round's seconds are kept (rows' samples_s). Writes decode-context-STAMP.{json,md,png}.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from bench import common
from infer import decoder
from infer.text import joined_prompt_ids, load_tokenizer

PAPER_CLAIM = ("Orthrus paper's long-context figure (Qwen3-8B, hardware not stated): Orthrus "
               "96.9 -> 98.8 tok/s from 16K to 40K tokens of context, nearly flat, while DFlash "
               "loses 45 % (78.9 -> 43.5)")
TTFT_TARGET_FROM = 3000   # the target: TTFT of a >= 3,000-token prompt <= HF's prefill time


def hf_prefill(hf, ids: list[int], all_logits: bool = False) -> Callable[[], None]:
    """HF's prefill of one prompt: one forward pass filling its KV cache and, as HF generate's
    prefill does, the last position's logits only (logits_to_keep=1); all_logits: every
    position's logits (a plain forward call, the figure recorded before 2026-12-03). On the
    peer's device; each call ends with hf.sync() (CUDA work is asynchronous)."""
    torch = hf.torch
    x = torch.tensor([ids], dtype=torch.long, device=hf.device)
    kwargs = {} if all_logits else {"logits_to_keep": 1}

    def once():
        with torch.inference_mode():
            hf.model(input_ids=x, use_cache=True, **kwargs)
        hf.sync()

    return once


def ours(params, cfg, mode: str, ids: list[int], args,
         max_new_tokens: int | None = None) -> Callable[[], Any]:
    """One timed run of ours: generate for the prompt (batch 1, greedy); max_new_tokens=1 (AR)
    is our time to first token, timed from outside like HF's prefill."""
    new = args.max_new_tokens if max_new_tokens is None else max_new_tokens

    def once():
        return decoder.generate(params, cfg, [ids], mode=mode, max_new_tokens=new,
                                batch_size=1, block_size=args.block_size,
                                prefill_chunk_size=args.prefill_chunk_size)[0]

    return once


def summary(runs: list[Any]) -> dict[str, Any]:
    """Our full timed runs of one mode: the decode figures of the run with the best total time
    (generate's own stats), and generate's internal time to first token (best of the runs; it
    starts after generate's setup, so it is not the TTFT compared with HF)."""
    best = min(runs, key=lambda r: r.stats.time_s)
    s = best.stats
    decode_s = max(s.time_s - s.ttft_s, 1e-9)
    return {"generate_internal_ttft_s": min(r.stats.ttft_s for r in runs), "time_s": s.time_s,
            "tokens": s.tokens, "tokens_per_s": s.tokens_per_s,
            "decode_tokens_per_s": (s.tokens - 1) / decode_s, "tpf": s.tpf,
            "acceptance_length": s.acceptance_length, "token_ids": best.token_ids}


def timed_interleaved(fns: dict[str, Callable[[], Any]], repeats: int
                      ) -> dict[str, tuple[list[Any], list[float]]]:
    """Warm every fn up once (in fns' order, untimed), then `repeats` rounds (at least 1) in
    which every fn runs once, timed by common.timed; the order rotates per round: round r starts
    at fn index r mod n and wraps around (for fns a, b, c: a b c, then b c a, then c a b), so no
    fn always runs first or after the same one. Per name: (its outputs, its seconds), one per
    round, in round order."""
    names = list(fns)
    for fn in fns.values():
        fn()
    out: dict[str, tuple[list[Any], list[float]]] = {name: ([], []) for name in names}
    for r in range(max(repeats, 1)):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            res, dt = common.timed(fns[name])
            out[name][0].append(res)
            out[name][1].append(dt)
    return out


def run_context(args, cfg, params, hf, lengths: list[int]) -> dict[str, Any]:
    record = common.header("decode-context", args)
    tok = load_tokenizer(os.path.dirname(args.tokenizer_file))
    rows = []
    for n in lengths:
        ids = joined_prompt_ids(tok, args.prompts, n)
        fns = {mode: ours(params, cfg, mode, ids, args) for mode in ("ar", "orthrus")}
        fns["ttft"] = ours(params, cfg, "ar", ids, args, max_new_tokens=1)
        if hf is not None:
            fns.update(hf=hf_prefill(hf, ids), hf_all=hf_prefill(hf, ids, all_logits=True))
        timed = timed_interleaved(fns, args.repeats)
        best = {name: min(secs) for name, (_, secs) in timed.items()}
        row = {"context": n, "ttft_s": best["ttft"], "hf_prefill_s": best.get("hf"),
               "hf_forward_all_logits_s": best.get("hf_all")}
        for mode in ("ar", "orthrus"):
            row[mode] = summary(timed[mode][0])
        row["orthrus_equals_ar"] = row["orthrus"].pop("token_ids") == row["ar"].pop("token_ids")
        row["samples_s"] = {name: secs for name, (_, secs) in timed.items()}
        rows.append(row)
        print(f"context {n:6d}: TTFT ours {row['ttft_s']:.3f} s"
              + (f" (HF prefill {row['hf_prefill_s']:.3f} s)" if hf is not None else "")
              + f", AR {row['ar']['decode_tokens_per_s']:.1f} tok/s, Orthrus "
              f"{row['orthrus']['decode_tokens_per_s']:.1f} tok/s (TPF "
              f"{row['orthrus']['tpf']:.3g}), Orthrus == AR: {row['orthrus_equals_ar']}",
              flush=True)
    first = rows[0]
    for r in rows:
        r["orthrus_tps_over_first"] = (r["orthrus"]["decode_tokens_per_s"]
                                       / first["orthrus"]["decode_tokens_per_s"])
        r["ar_tps_over_first"] = r["ar"]["decode_tokens_per_s"] / first["ar"]["decode_tokens_per_s"]
        r["ttft_over_hf_prefill"] = (r["ttft_s"] / r["hf_prefill_s"]
                                     if r["hf_prefill_s"] else None)
    targets = [common.target(
        f"HF prefill time / our TTFT >= 1 at context {r['context']}",
        1.0 / r["ttft_over_hf_prefill"] if r["ttft_over_hf_prefill"] else None, 1.0,
        "batch 1, compile excluded") for r in rows if r["context"] >= TTFT_TARGET_FROM]
    record.update(rows=rows, targets=targets, paper_claim=PAPER_CLAIM,
                  hf_device=str(hf.device) if hf is not None else None)
    files = common.write_record(args.out_dir, "decode-context", record, markdown,
                                chart=lambda path: plot(path, rows, record))
    common.print_targets(targets)
    print(f"wrote {', '.join(files.values())}")
    return record


def markdown(record: dict[str, Any]) -> str:
    a = record["args"]
    table = [[r["context"], r["hf_prefill_s"], r.get("hf_forward_all_logits_s"), r["ttft_s"],
              r["ttft_over_hf_prefill"],
              r["ar"]["decode_tokens_per_s"], r["orthrus"]["decode_tokens_per_s"],
              r["orthrus_tps_over_first"], r["orthrus"]["tpf"],
              r["orthrus"]["acceptance_length"], r["orthrus_equals_ar"]] for r in record["rows"]]
    machine = record["machine"]
    scale = common.scale_caveat(machine)
    hf_device = record.get("hf_device") or "not run"
    lines = [common.md_preamble("Decode speed against context length (batch 1)", record),
             f"- model `{a['model']}`, HF peer `{a['hf_dir']}` on {hf_device}, prompts: "
             f"`{a['prompts']}` joined and cut to each context length; max_new_tokens "
             f"{a['max_new_tokens']}, greedy, prefill chunk {a['prefill_chunk_size']}",
             "- our TTFT = wall time of generate(mode=\"ar\", max_new_tokens=1) for the prompt, "
             "timed from outside like HF's prefill (chunked prefill plus host-side setup); "
             "decode tok/s = (tokens - 1) / (time - generate's internal TTFT) of the fastest "
             "full run; compile excluded (each timed call warmed up once); all calls timed in "
             "turns, --repeats rounds, each round's order rotated by one; best of the rounds, "
             f"every round's seconds in the JSON (samples_s). {scale}",
             f"- {record['paper_claim']}.\n",
             "- HF prefill = one forward pass with logits_to_keep=1 (the last position's logits, "
             "as HF generate's prefill computes them); HF all-logits = the same pass returning "
             "every position's logits (what this benchmark timed before 2026-12-03).\n",
             common.md_table(["context", "HF prefill s", "HF all-logits s", "our TTFT s",
                              "TTFT / HF prefill",
                              "AR tok/s", "Orthrus tok/s", "Orthrus vs first context",
                              "Orthrus TPF", "Orthrus AL", "Orthrus == AR"], table),
             "\n## Targets\n"]
    lines += [f"- **{t['status']}** {t['target']}: "
              + ("n/a" if t["value"] is None else f"{t['value']:.3g}") + f"; {t['detail']}"
              for t in record["targets"]]
    return "\n".join(lines) + "\n"


def plot(path: str, rows, record) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ctx, [r["ar"]["decode_tokens_per_s"] for r in rows], "o-", label="ours, AR")
    a1.plot(ctx, [r["orthrus"]["decode_tokens_per_s"] for r in rows], "o-", label="ours, Orthrus")
    a1.set(xlabel="context tokens", ylabel="decode tokens/s (batch 1)", ylim=(0, None),
           title="decode throughput vs context")
    a1.legend()
    a2.plot(ctx, [r["ttft_s"] for r in rows], "o-", label="ours: time to first token")
    if rows[0]["hf_prefill_s"] is not None:
        a2.plot(ctx, [r["hf_prefill_s"] for r in rows], "s--", label="HF transformers prefill")
    a2.set(xlabel="context tokens", ylabel="seconds", ylim=(0, None), title="prefill")
    a2.legend()
    fig.suptitle(f"micro model, {common.device_label(record['machine'])}, {record['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
