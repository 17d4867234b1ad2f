"""Acceptance of a model dir under infer.decoder.generate (Orthrus mode) on dev prompts.

    python -m train.eval_accept --model DIR [--prompts FILE --n 20 --max-new-tokens 128]
        [--chat [--system TEXT]]

Greedy and sampled (T 0.7, top-p 0.8, top-k 20). acceptance_length = drafts accepted per
cycle, bonus excluded (the decoder's definition); also TPF and per-position acceptance.
With --chat the prompts are formatted as train.make_data --chat formats them.
"""
from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np

from infer.decoder import generate, summarize
from infer.text import load_tokenizer
from orthrus_jax import paths
from orthrus_jax.checkpoint import load_any_model
from orthrus_jax.cli import ArgumentParser, add_prefill_chunk_argument, run_cli
from orthrus_jax.model import PREFILL_CHUNK
from train.make_data import prompt_ids, read_prompts

SETTINGS = {"greedy": dict(temperature=0.0),
            "sampled": dict(temperature=0.7, top_p=0.8, top_k=20, seed=0)}


def evaluate(model_dir: str, prompts_path: str, n: int = 20, max_new_tokens: int = 128,
             batch_size: int = 20, settings=("greedy", "sampled"), chat: bool = False,
             system: str | None = None, prefill_chunk_size: int = PREFILL_CHUNK) -> dict:
    cfg, params = load_any_model(model_dir, jnp.float32)
    tok = load_tokenizer(model_dir)
    prompts = prompt_ids(tok, model_dir, read_prompts(prompts_path, n),
                         cfg.max_position_embeddings - max_new_tokens, chat=chat, system=system)
    out = {"model": model_dir, "prompts": n, "max_new_tokens": max_new_tokens, "chat": chat}
    for name in settings:
        res = generate(params, cfg, prompts, mode="orthrus", max_new_tokens=max_new_tokens,
                       batch_size=batch_size, prefill_chunk_size=prefill_chunk_size,
                       **SETTINGS[name])
        summ = summarize(res)
        cycles = np.array([r.stats.cycles for r in res], float)
        pos = np.array([r.stats.position_acceptance for r in res]) * cycles[:, None]
        summ["position_acceptance"] = [round(float(x), 4) for x in pos.sum(0) / cycles.sum()]
        summ.pop("acceptance_hist", None)
        out[name] = summ
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m train.eval_accept", description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default=paths.default_path(paths.DEV_PROMPTS))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--greedy-only", action="store_true")
    ap.add_argument("--chat", action="store_true",
                    help="format prompts with the chat template, as train.make_data --chat")
    ap.add_argument("--system", default=None, help="with --chat: a system message first")
    add_prefill_chunk_argument(ap)
    a = ap.parse_args(argv)
    if a.system is not None and not a.chat:
        ap.error("argument --system: only with --chat")
    return run_cli(lambda: print(json.dumps(evaluate(
        a.model, a.prompts, a.n, a.max_new_tokens,
        settings=("greedy",) if a.greedy_only else ("greedy", "sampled"), chat=a.chat,
        system=a.system, prefill_chunk_size=a.prefill_chunk_size))))


if __name__ == "__main__":
    sys.exit(main())
