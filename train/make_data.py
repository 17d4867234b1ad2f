"""Self-distillation data: the frozen model's own greedy continuations of training prompts.

    python -m train.make_data --model DIR --prompts FILE --out DIR --max-new-tokens N [--limit N]

Each document is `prompt tokens + greedy continuation` with a response mask (0 = context,
1 = target). Generation runs in chunks of prompts; each chunk is written atomically as
OUT/chunks/chunk_NNNNN.npz, so an interrupted run resumes by skipping finished chunks. At the
end the chunks are joined into OUT/tokens.npy, OUT/mask.npy (flat) and OUT/offsets.npy
(doc i = [offsets[i], offsets[i+1])), which `train.data.DocSource` reads by random access
(numpy memmap), as a grain RandomAccessDataSource.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from orthrus_jax.cli import ArgumentParser
from orthrus_jax.cache import init_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.model import ar_forward, lm_logits


def load_any_model(model_dir: str, dtype=jnp.float32):
    """(cfg, params) from an Orthrus model dir (params/) or an HF dir (model.safetensors)."""
    if os.path.isdir(os.path.join(model_dir, "params")):
        from orthrus_jax.checkpoint import load_model
        return load_model(model_dir, dtype)
    from convert.hf_params import read_hf_params
    return read_hf_params(model_dir, dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new"))
def _greedy_ar(params, cfg: Qwen3Config, tokens, lengths, max_new: int):
    """Batched greedy AR decoding of right-padded prompts tokens [B, T] with lengths [B].

    Prefill writes K/V at 0..T-1; each row then continues at its own length (stale padded entries
    are masked by position < length and overwritten). Returns new tokens [B, max_new].
    """
    b, t = tokens.shape
    cache = init_cache(cfg, b, t + max_new + 1, params["embed"].dtype)
    hidden, cache = ar_forward(params, cfg, tokens, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = jnp.argmax(lm_logits(params, last), -1).astype(jnp.int32)
    cache = cache.replace(length=lengths.astype(jnp.int32))

    def step(carry, _):
        tok, cache = carry
        h, cache = ar_forward(params, cfg, tok[:, None], cache)
        cache = cache.replace(length=cache.length + 1)
        nxt = jnp.argmax(lm_logits(params, h[:, 0]), -1).astype(jnp.int32)
        return (nxt, cache), tok

    _, out = jax.lax.scan(step, (first, cache), None, length=max_new)
    return out.T


def greedy_generate(params, cfg: Qwen3Config, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations (cut after the first EOS, which is kept) for token-id prompts."""
    try:  # the project decoder (batched AR greedy, one jitted while_loop)
        from infer.decoder import generate as infer_generate
    except ImportError:
        infer_generate = None
    if infer_generate is not None:
        results = infer_generate(params, cfg, prompts, mode="ar", max_new_tokens=max_new,
                                 batch_size=len(prompts))
        return [_cut_eos(list(map(int, r.token_ids)), cfg) for r in results]
    # Fallback (no decoder installed): a plain jitted greedy loop over the same model code.
    # Bucket the padded length to a multiple of 128 to bound recompilations.
    t = max(len(p) for p in prompts)
    t = -(-t // 128) * 128
    arr = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    out = np.asarray(_greedy_ar(params, cfg, jnp.asarray(arr), jnp.asarray(lens), max_new))
    return [_cut_eos(list(map(int, row)), cfg) for row in out]


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


def make_data(model_dir: str, prompts_path: str, out_dir: str, max_new_tokens: int,
              limit: int | None = None, chunk_size: int = 256, batch_size: int = 128,
              max_prompt_tokens: int = 1024) -> str:
    from tokenizers import Tokenizer

    os.makedirs(os.path.join(out_dir, "chunks"), exist_ok=True)
    cfg, params = load_any_model(model_dir, jnp.float32)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    texts = read_prompts(prompts_path, limit)
    n_chunks = -(-len(texts) // chunk_size)
    meta = {"model": os.path.abspath(model_dir), "prompts": os.path.abspath(prompts_path),
            "max_new_tokens": max_new_tokens, "limit": limit, "chunk_size": chunk_size,
            "num_prompts": len(texts), "max_prompt_tokens": max_prompt_tokens}
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        same = ("model", "prompts", "max_new_tokens", "chunk_size", "max_prompt_tokens")
        if any(old.get(k) != meta[k] for k in same):  # --limit may change: chunks stay valid
            raise SystemExit(f"{out_dir} holds data made with other settings ({old}); use a new --out")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    t0, new_tokens = time.time(), 0
    bar = tqdm(range(n_chunks), desc="make_data", unit="chunk")
    for c in bar:
        path = os.path.join(out_dir, "chunks", f"chunk_{c:05d}.npz")
        if os.path.exists(path):
            continue
        ids = [tok.encode(t).ids[-max_prompt_tokens:] for t in texts[c * chunk_size:(c + 1) * chunk_size]]
        ids = [p if p else [cfg.eos_token_ids[0] if cfg.eos_token_ids else 0] for p in ids]
        order = np.argsort([len(p) for p in ids])  # similar lengths per batch, less padding
        conts: list[list[int]] = [[] for _ in ids]
        for s in range(0, len(ids), batch_size):
            sel = order[s:s + batch_size]
            for j, cont in zip(sel, greedy_generate(params, cfg, [ids[j] for j in sel], max_new_tokens)):
                conts[j] = cont
        toks = np.concatenate([np.asarray(p + q, np.int32) for p, q in zip(ids, conts)])
        mask = np.concatenate([np.r_[np.zeros(len(p), np.uint8), np.ones(len(q), np.uint8)]
                               for p, q in zip(ids, conts)])
        lens = np.asarray([len(p) + len(q) for p, q in zip(ids, conts)], np.int64)
        new_tokens += int(mask.sum())
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=toks, mask=mask, lengths=lens)
        os.replace(tmp, path)
        bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t0):.0f}")
    finalize(out_dir, n_chunks)
    return out_dir


def finalize(out_dir: str, n_chunks: int) -> None:
    """Join chunk files into tokens.npy / mask.npy / offsets.npy (memmap-readable)."""
    files = sorted(glob.glob(os.path.join(out_dir, "chunks", "chunk_*.npz")))
    assert len(files) == n_chunks, f"expected {n_chunks} chunks, found {len(files)}"
    toks, masks, lens = [], [], []
    for fpath in files:
        with np.load(fpath) as z:
            toks.append(z["tokens"]); masks.append(z["mask"]); lens.append(z["lengths"])
    lengths = np.concatenate(lens)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    np.save(os.path.join(out_dir, "tokens.npy"), np.concatenate(toks))
    np.save(os.path.join(out_dir, "mask.npy"), np.concatenate(masks))
    np.save(os.path.join(out_dir, "offsets.npy"), offsets)
    print(f"{out_dir}: {len(lengths)} documents, {int(offsets[-1])} tokens, "
          f"{int(np.concatenate(masks).sum())} response tokens")


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m train.make_data", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF dir or Orthrus model dir")
    ap.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    a = ap.parse_args(argv)
    make_data(a.model, a.prompts, a.out, a.max_new_tokens, a.limit, a.chunk_size, a.batch_size,
              a.max_prompt_tokens)


if __name__ == "__main__":
    main()
