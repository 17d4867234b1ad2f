"""Self-distillation data: the frozen model's own greedy continuations of training prompts.

    python -m train.make_data --model DIR --prompts FILE --out DIR --max-new-tokens N [--limit N]
        [--chat [--system TEXT]] [--dtype bf16] [--tensor-parallel-size N] [--data-parallel-size N]
        [--distributed]

Each document is `prompt tokens + greedy continuation` with a response mask (0 = context,
1 = target); with --chat the prompt is first rendered with the model's chat template (a user
message, thinking off). Generation runs in chunks of prompts; each chunk is written atomically as
OUT/chunks/chunk_NNNNN.npz, so an interrupted run resumes by skipping finished chunks (a rerun
with a larger --limit regenerates a chunk that holds fewer prompts than it should). At the
end the chunks are joined into OUT/tokens.npy, OUT/mask.npy (flat) and OUT/offsets.npy
(doc i = [offsets[i], offsets[i+1])), which `train.data.DocSource` reads by random access
(numpy memmap), as a grain RandomAccessDataSource.

The teacher runs in --dtype (default bf16 on GPU/TPU, fp32 on CPU), over a device mesh with
--tensor-parallel-size / --data-parallel-size (heads over tensor, rows of each batch over data),
and across hosts with --distributed: every host runs the same command, the first one writes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from infer.decoder import length_bucket
from infer.engine import generate_all
from infer.text import chat_prompt, encode, load_tokenizer
from orthrus_jax import sharding as shd
from orthrus_jax.checkpoint import load_any_model
from orthrus_jax.cli import (
    ArgumentParser, add_parallel_arguments, add_prefill_chunk_argument, check_parallel_arguments,
    default_compute_dtype, parse_dtype, run_cli,
)
from orthrus_jax.config import ConfigError, Qwen3Config, load_config
from orthrus_jax.model import PREFILL_CHUNK


def greedy_generate(params, cfg: Qwen3Config, prompts: list[list[int]], max_new: int,
                    mesh=None, slots: int = 128, max_len: int | None = None,
                    prefill_chunk_size: int = PREFILL_CHUNK) -> list[list[int]]:
    """Greedy continuations (cut after the first EOS, which is kept) for token-id prompts on the
    continuous-batching engine (a finished row's slot takes the next prompt at once), over a
    device mesh when one is given (params placed on it)."""
    results = generate_all(params, cfg, prompts, mode="ar", max_new_tokens=max_new, slots=slots,
                           max_len=max_len, mesh=mesh, prefill_chunk_size=prefill_chunk_size)
    return [_cut_eos(list(map(int, r.token_ids)), cfg) for r in results]


def _cut_eos(tokens: list[int], cfg: Qwen3Config) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in cfg.eos_token_ids:
            return tokens[: i + 1]
    return tokens


def read_prompts(path: str, limit: int | None) -> list[str]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["prompt"])
                if limit is not None and len(out) >= limit:
                    break
    return out


def prompt_ids(tok, model_dir: str, texts: list[str], max_prompt_tokens: int, chat: bool = False,
               system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt (its last max_prompt_tokens): the text as is, or with --chat the
    text as a user message (after an optional system message) in the model's chat template, with
    the generation prompt and Qwen3's thinking switched off (the paper's format)."""
    return [encode(tok, chat_prompt(model_dir, t, system=system) if chat else t)
            [-max_prompt_tokens:] for t in texts]


def _chunk_path(out_dir: str, c: int) -> str:
    return os.path.join(out_dir, "chunks", f"chunk_{c:05d}.npz")


def _chunk_docs(path: str) -> int:
    """Documents in a finished chunk file (0 when it is missing or unreadable)."""
    try:
        with np.load(path) as z:
            return len(z["lengths"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return 0


META_DEFAULTS = {"chat": False, "system": None}   # keys that older meta.json files lack


def make_data(model_dir: str, prompts_path: str, out_dir: str, max_new_tokens: int,
              limit: int | None = None, chunk_size: int = 256, batch_size: int = 128,
              max_prompt_tokens: int = 1024, chat: bool = False, system: str | None = None,
              dtype: str | None = None, tensor: int = 1, data: int = 1,
              distributed: bool = False, prefill_chunk_size: int = PREFILL_CHUNK) -> str:
    """Generate (or resume) OUT_DIR. Chunk c holds prompts [c * chunk_size, (c + 1) * chunk_size)
    of the first `limit`; a chunk is reused when it holds at least the prompts it should (one
    made with a larger --limit is cut), and generated again when it holds fewer (one made with a
    smaller --limit). dtype: the teacher's compute dtype (default_compute_dtype() when None);
    tensor / data: the inference mesh; with several processes only the first writes; prompts
    are prefilled prefill_chunk_size tokens at a time."""
    tok = load_tokenizer(model_dir)
    texts = read_prompts(prompts_path, limit)
    if not texts:
        raise ConfigError(f"--prompts {prompts_path}: no prompts in it")
    ids_of = functools.partial(prompt_ids, tok, model_dir, max_prompt_tokens=max_prompt_tokens,
                               chat=chat, system=system)
    if chat:
        ids_of(texts[:1] or [""])   # no chat template: fail now, before anything is written
    n_chunks = -(-len(texts) // chunk_size)
    want = [min(chunk_size, len(texts) - c * chunk_size) for c in range(n_chunks)]
    meta = {"model": os.path.abspath(model_dir), "prompts": os.path.abspath(prompts_path),
            "max_new_tokens": max_new_tokens, "limit": limit, "chunk_size": chunk_size,
            "num_prompts": len(texts), "max_prompt_tokens": max_prompt_tokens, "chat": chat,
            "system": system}
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = {**META_DEFAULTS, **json.load(f)}
        same = ("model", "prompts", "max_new_tokens", "chunk_size", "max_prompt_tokens", "chat",
                "system")   # --limit may change: chunks are checked one by one below
        for k in same:
            if old.get(k) != meta[k]:
                raise ConfigError(f"--out {out_dir} holds data made with other settings ({k} "
                                  f"{old.get(k)!r}, now {meta[k]!r}); use a new --out")
    mesh = None   # checked before anything is written
    if tensor * data > 1 or distributed:
        mesh = shd.inference_mesh(load_config(model_dir), tensor, data)
    todo = [c for c in range(n_chunks) if _chunk_docs(_chunk_path(out_dir, c)) < want[c]]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(os.path.join(out_dir, "chunks"), exist_ok=True)
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
    cfg, params = (load_any_model(model_dir, jnp.dtype(dtype or default_compute_dtype()), mesh,
                                  inference=True) if todo else (None, None))
    # one cache size for every chunk: one compiled engine
    max_len = (min(length_bucket(max_prompt_tokens + max_new_tokens), cfg.max_position_embeddings)
               if todo else None)
    t0, new_tokens = time.time(), 0
    bar = tqdm(todo, desc="make_data", unit="chunk")
    for c in bar:
        ids = ids_of(texts[c * chunk_size:(c + 1) * chunk_size])
        ids = [p if p else [cfg.eos_token_ids[0] if cfg.eos_token_ids else 0] for p in ids]
        conts = greedy_generate(params, cfg, ids, max_new_tokens, mesh=mesh, slots=batch_size,
                                max_len=max_len, prefill_chunk_size=prefill_chunk_size)
        if not writer:
            continue
        toks = np.concatenate([np.asarray(p + q, np.int32) for p, q in zip(ids, conts)])
        mask = np.concatenate([np.r_[np.zeros(len(p), np.uint8), np.ones(len(q), np.uint8)]
                               for p, q in zip(ids, conts)])
        lens = np.asarray([len(p) + len(q) for p, q in zip(ids, conts)], np.int64)
        new_tokens += int(mask.sum())
        path = _chunk_path(out_dir, c)
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=toks, mask=mask, lengths=lens)
        os.replace(tmp, path)
        bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t0):.0f}")
    if writer:
        finalize(out_dir, want)
    return out_dir


def finalize(out_dir: str, docs_per_chunk: list[int]) -> None:
    """Join the first docs_per_chunk[c] documents of each chunk c into tokens.npy / mask.npy /
    offsets.npy (memmap-readable)."""
    toks, masks, lens = [], [], []
    for c, n in enumerate(docs_per_chunk):
        with np.load(_chunk_path(out_dir, c)) as z:
            lengths = z["lengths"][:n]
            assert len(lengths) == n, f"chunk {c}: {len(lengths)} documents, expected {n}"
            end = int(lengths.sum())
            toks.append(z["tokens"][:end]); masks.append(z["mask"][:end]); lens.append(lengths)
    lengths = np.concatenate(lens)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    np.save(os.path.join(out_dir, "tokens.npy"), np.concatenate(toks))
    np.save(os.path.join(out_dir, "mask.npy"), np.concatenate(masks))
    np.save(os.path.join(out_dir, "offsets.npy"), offsets)
    print(f"{out_dir}: {len(lengths)} documents, {int(offsets[-1])} tokens, "
          f"{int(np.concatenate(masks).sum())} response tokens")


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m train.make_data", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF dir or Orthrus model dir")
    ap.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=256,
                    help="prompts per resumable output chunk (default 256)")
    add_prefill_chunk_argument(ap)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--chat", action="store_true",
                    help="format each prompt as a user message with the tokenizer's chat template "
                         "(generation prompt, thinking off), as the paper; the rendered prompt is "
                         "context (mask 0), the continuation the targets")
    ap.add_argument("--system", default=None,
                    help="with --chat: a system message first (default: none)")
    ap.add_argument("--dtype", type=parse_dtype, default=None,
                    help="the teacher's compute dtype: fp32, bf16 or fp16 (float32, bfloat16, "
                         "float16 accepted); default bf16 on GPU/TPU, fp32 on CPU")
    add_parallel_arguments(ap)
    a = ap.parse_args(argv)
    check_parallel_arguments(ap, a)
    if a.system is not None and not a.chat:
        ap.error("argument --system: only with --chat")
    for flag in ("max_new_tokens", "limit", "chunk_size", "batch_size", "max_prompt_tokens"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            ap.error(f"argument --{flag.replace('_', '-')}: must be >= 1")
    shd.maybe_initialize_distributed(a.distributed)
    return run_cli(lambda: make_data(a.model, a.prompts, a.out, a.max_new_tokens, a.limit,
                                     a.chunk_size, a.batch_size, a.max_prompt_tokens, a.chat,
                                     a.system, a.dtype, a.tensor_parallel_size,
                                     a.data_parallel_size, a.distributed, a.prefill_chunk_size))


if __name__ == "__main__":
    sys.exit(main())
