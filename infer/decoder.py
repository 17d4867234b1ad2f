"""Batched Orthrus (diffusion draft + AR verify) and plain AR generation over one shared KV cache.

    results = generate(params, cfg, [[ids...], ...], mode="orthrus" | "ar", max_new_tokens=256)

After a shared prefill (AR passes over the right-padded prompts, prefill_chunk tokens at a time,
which also yield the first token), the whole generation is one jit-compiled `lax.while_loop`
with static shapes:

- orthrus cycle: diffusion pass on [anchor, MASK x (K-1)] -> drafts d_1..d_{K-1}; AR pass on
  [anchor, d_1..d_{K-1}] (writes K/V at each row's length); accept the longest verified prefix;
  the correction/bonus token becomes the next anchor; commit `length += n_acc + 1`. Rejected K/V
  stay in the cache as stale entries past `length` (masked, overwritten later): no copies.
- tree verification (verify="tree"): the diffusion pass's per-position distributions give a
  draft tree of tree_budget nodes (orthrus_jax.tree); one AR pass verifies every node at position
  length + depth, attending to the cache and its ancestors only; the K/V of the longest accepted
  root-to-node path are written to consecutive cache positions, the rest is never written.
- ar step: one AR pass on [anchor]; commit `length += 1`.

Rows have their own prompt length, acceptance, EOS and max_new_tokens; finished rows idle until the
whole batch is done. Prompt lengths and batch sizes are padded to buckets, so new prompts reuse
compiled code. `TRACE_COUNTS` counts traces of the jitted functions (a compile counter for tests).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from orthrus_jax import sharding as shd
from orthrus_jax import spec as S
from orthrus_jax import tree as T
from orthrus_jax.cache import KVCache, init_cache, write_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.model import (
    PREFILL_CHUNK, ar_block, ar_forward, chunked_prefill, draft_block, lm_logits,
)

Array = jax.Array
MODES = ("orthrus", "ar")
VERIFY = ("chain", "tree")
TRACE_COUNTS: collections.Counter = collections.Counter()
MIN_LEN_BUCKET = 16


class GenerationError(ValueError):
    """A request the decoder cannot serve (empty prompt, prompt too long, bad settings)."""


# ---------------------------------------------------------------------------------------------
# static description and loop state


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static (hashable) decode settings: everything that changes shapes or code paths."""

    cfg: Qwen3Config
    mode: str = "orthrus"
    block_size: int = 32
    max_new_tokens: int = 256  # output buffer length (bucketed); per-row limits are traced
    greedy: bool = True
    top_k: int = 0  # sampling: static, 0 = off
    use_top_p: bool = False  # sampling: top_p < 1
    eos_ids: tuple[int, ...] = ()
    verify: str = "chain"  # orthrus: "chain" (K-1 drafts) or "tree" (tree_budget nodes)
    tree_budget: int = 0  # draft nodes per cycle besides the anchor (verify="tree")
    mesh: Any = None  # a (data, fsdp=1, tensor) inference mesh: rows over data, heads over tensor
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per prefill chunk

    @property
    def nodes(self) -> int:
        """Draft tokens the AR view verifies per cycle besides the anchor."""
        if self.mode != "orthrus":
            return 0
        return self.tree_budget if self.verify == "tree" else self.block_size - 1

    @property
    def k(self) -> int:
        """Tokens per pass in the loop: K (orthrus) or 1 (ar)."""
        return self.block_size if self.mode == "orthrus" else 1

    def cache_len(self, prompt_bucket: int) -> int:
        # worst active row: length = prompt + max_new - 2, writes K entries; +1 slack as advised
        return prompt_bucket + self.max_new_tokens + self.k + 1


@flax.struct.dataclass
class Sampling:
    """Traced sampling values (changing them does not recompile; top_k is static in DecodeSpec)."""

    temperature: Array
    top_p: Array

    @classmethod
    def make(cls, temperature: float, top_p: float) -> "Sampling":
        return cls(jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p))


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    anchor: Array      # int32[B]: last emitted token, not yet in the cache
    out: Array         # int32[B, max_new + K]: emitted tokens
    n_out: Array       # int32[B]
    max_new: Array     # int32[B]: per-row limit (0 for batch padding rows)
    done: Array        # bool[B]
    key: Array
    cycles: Array      # int32[B]: loop iterations while the row was active
    acc_hist: Array    # int32[B, K]: histogram of accepted (and emitted) drafts per cycle
    pos_acc: Array     # int32[B, max(K-1, 1)]: cycles where draft i was accepted and emitted
    nodes: Array       # int32[B]: draft nodes verified (tree: valid nodes; chain: K-1 a cycle)
    judged: Array      # int32[B]: tree walk steps at a node with children (accepted or not)
    accepted: Array    # int32[B]: tree walk steps that accepted a child
    steps: Array       # int32[]: loop iterations of the batch


def _processed(spec: DecodeSpec, sampling: Sampling, logits: Array) -> Array:
    return S.process_logits(logits, sampling.temperature, sampling.top_p, top_k=spec.top_k,
                            use_top_p=spec.use_top_p)


def _pick(spec: DecodeSpec, sampling: Sampling, key: Array, logits: Array) -> Array:
    if spec.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return S.sample_tokens(key, _processed(spec, sampling, logits))


def _constrain(spec: DecodeSpec, state: Any) -> Any:
    """On a mesh: the KV cache over rows (data) and KV heads (tensor), per-row arrays over rows
    (a DecodeState or a bare KVCache)."""
    if spec.mesh is None:
        return state
    cache = state if isinstance(state, KVCache) else state.cache
    kv_spec, len_spec = shd.cache_specs(spec.cfg, spec.mesh, cache.length.shape[0])

    def put(x, pspec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, pspec))

    cache = cache.replace(k=put(cache.k, kv_spec), v=put(cache.v, kv_spec),
                          length=put(cache.length, len_spec))
    if isinstance(state, KVCache):
        return cache
    rows = {f: put(getattr(state, f), shd.row_spec(spec.mesh, getattr(state, f).shape))
            for f in ("anchor", "out", "n_out", "max_new", "done", "cycles", "acc_hist", "pos_acc",
                      "nodes", "judged", "accepted")}
    return state.replace(cache=cache, **rows)


def _write_rows(buf: Array, block: Array, start: Array) -> Array:
    return jax.vmap(lambda b, x, s: jax.lax.dynamic_update_slice(b, x, (s,)))(buf, block, start)


# ---------------------------------------------------------------------------------------------
# prefill, step, loop (pure; jitted below)


def prefill_fn(params: Any, spec: DecodeSpec, cache: KVCache, tokens: Array, prompt_lens: Array,
               max_new: Array, sampling: Sampling, key: Array) -> DecodeState:
    """Chunked AR prefill of right-padded prompts [B, P] into an empty cache (empty_cache) of
    spec.cache_len(P) positions, spec.prefill_chunk tokens at a time; samples the first token
    (the first anchor)."""
    TRACE_COUNTS["prefill"] += 1
    b, p = tokens.shape
    last, cache = chunked_prefill(params, spec.cfg, tokens, prompt_lens, _constrain(spec, cache),
                                  spec.prefill_chunk)
    key, sub = jax.random.split(key)
    first = _pick(spec, sampling, sub, lm_logits(params, last))
    k = spec.block_size
    out = jnp.zeros((b, spec.max_new_tokens + spec.k), jnp.int32).at[:, 0].set(first)
    n_out = jnp.minimum(max_new, 1).astype(jnp.int32)
    is_eos = jnp.zeros((b,), bool)
    for e in spec.eos_ids:
        is_eos = is_eos | (first == e)
    done = (n_out >= max_new) | is_eos
    return _constrain(spec, DecodeState(
        cache=cache, anchor=first, out=out,
        n_out=n_out, max_new=max_new.astype(jnp.int32), done=done, key=key,
        cycles=jnp.zeros((b,), jnp.int32), acc_hist=jnp.zeros((b, k), jnp.int32),
        pos_acc=jnp.zeros((b, max(k - 1, 1)), jnp.int32), nodes=jnp.zeros((b,), jnp.int32),
        judged=jnp.zeros((b,), jnp.int32), accepted=jnp.zeros((b,), jnp.int32),
        steps=jnp.int32(0)))


def step_fn(params: Any, spec: DecodeSpec, state: DecodeState, sampling: Sampling) -> DecodeState:
    """One cycle (orthrus: draft + verify; ar: one token) for every row; finished rows idle."""
    cfg = spec.cfg
    key, k_draft, k_verify = jax.random.split(state.key, 3)
    cache = state.cache
    n_nodes = jnp.full(state.anchor.shape, spec.nodes, jnp.int32)
    judged = jnp.zeros_like(n_nodes)
    visible = jnp.where(state.done, 0, cache.length)  # finished rows read no cache
    if spec.mode == "orthrus" and spec.verify == "tree":
        drafts, n_acc, nxt, cache, n_nodes, judged = _tree_cycle(params, spec, state, sampling,
                                                                 k_draft, k_verify, visible)
    elif spec.mode == "orthrus":
        k = spec.block_size
        q_logits = lm_logits(params, draft_block(params, cfg, state.anchor, cache, k,
                                                 visible)[:, : k - 1])
        if spec.greedy:
            drafts = jnp.argmax(q_logits, axis=-1).astype(jnp.int32)
        else:
            q_lp = _processed(spec, sampling, q_logits)
            drafts = S.sample_tokens(k_draft, q_lp)
        block_in = jnp.concatenate([state.anchor[:, None], drafts], axis=1)
        hidden, cache = ar_forward(params, cfg, block_in, cache, visible=visible)
        p_logits = lm_logits(params, hidden)
        if spec.greedy:
            n_acc, nxt = S.greedy_verify(drafts, p_logits)
        else:
            n_acc, nxt = S.rejection_verify(k_verify, drafts, _processed(spec, sampling, p_logits),
                                            q_lp)
    else:
        hidden, cache = ar_forward(params, cfg, state.anchor[:, None], cache, visible=visible)
        nxt = _pick(spec, sampling, k_verify, lm_logits(params, hidden[:, 0]))
        drafts = jnp.zeros((state.anchor.shape[0], 0), jnp.int32)
        n_acc = jnp.zeros_like(nxt)
    block, n_emit, finished = S.commit_block(drafts, n_acc, nxt, state.n_out, state.max_new,
                                             spec.eos_ids)
    active = ~state.done
    n_emit = jnp.where(active, n_emit, 0)
    new_anchor = jnp.take_along_axis(block, jnp.maximum(n_emit - 1, 0)[:, None], axis=1)[:, 0]
    out = _write_rows(state.out, block, state.n_out)  # past n_out for finished rows: unused
    length = jnp.where(active, cache.length + n_acc + 1, cache.length)
    # statistics count the accepted drafts that were emitted: an EOS or max_new_tokens cut
    # drops the rest of the block (and the correction/bonus token with it)
    n_kept = jnp.minimum(n_acc, n_emit)
    kk = state.acc_hist.shape[1]
    hist = state.acc_hist + (active[:, None] & (jnp.arange(kk)[None, :] == n_kept[:, None]))
    pos = state.pos_acc + (active[:, None]
                           & (jnp.arange(state.pos_acc.shape[1])[None, :] < n_kept[:, None]))
    return _constrain(spec, state.replace(
        cache=cache.replace(length=length.astype(jnp.int32)),
        anchor=jnp.where(active, new_anchor, state.anchor), out=out,
        n_out=state.n_out + n_emit, done=state.done | (active & finished), key=key,
        cycles=state.cycles + active.astype(jnp.int32), acc_hist=hist.astype(jnp.int32),
        pos_acc=pos.astype(jnp.int32), nodes=state.nodes + jnp.where(active, n_nodes, 0),
        judged=state.judged + jnp.where(active, judged, 0),
        accepted=state.accepted + jnp.where(active, n_acc, 0), steps=state.steps + 1))


def _tree_cycle(params: Any, spec: DecodeSpec, state: DecodeState, sampling: Sampling,
                k_draft: Array, k_verify: Array, visible: Array
                ) -> tuple[Array, Array, Array, KVCache, Array, Array]:
    """The batch decoder's tree cycle: every row greedy, or every row sampled (tree_cycle)."""
    b = state.anchor.shape[0]
    return tree_cycle(params, spec.cfg, spec.block_size, spec.tree_budget, state.anchor,
                      state.cache, sampled=jnp.full((b,), not spec.greedy),
                      any_sampled=not spec.greedy,
                      process=lambda logits: _processed(spec, sampling, logits),
                      k_draft=jax.random.split(k_draft, b), k_verify=jax.random.split(k_verify, b),
                      accepted=state.accepted, judged=state.judged, visible=visible)


def _row(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[None], x)


def _unrow(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[0], x)


def _branch(pred: Any, on_true: Callable[[], Any], on_false: Callable[[], Any]) -> Any:
    """on_true() if pred else on_false(): by Python when pred is static, else lax.cond."""
    if isinstance(pred, bool):
        return on_true() if pred else on_false()
    return jax.lax.cond(pred, on_true, on_false)


def _select_rows(rows: Array, a: Any, b: Any) -> Any:
    """Per row (leading axis), a where rows else b, over matching pytrees."""
    return jax.tree_util.tree_map(
        lambda x, y: jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def tree_cycle(params: Any, cfg: Qwen3Config, block_size: int, budget: int, anchor: Array,
               cache: KVCache, *, sampled: Array, any_sampled: bool | Array,
               process: Callable[[Array], Array], k_draft: Array, k_verify: Array,
               accepted: Array, judged: Array, visible: Array | None = None
               ) -> tuple[Array, Array, Array, KVCache, Array, Array]:
    """Draft a tree of `budget` nodes per row, verify every node in one AR pass, write the
    accepted path's K/V at each row's length (the cache length is left to the caller).

    Shared by the batch decoder and the engine. sampled: bool[B], rows that sample (the others
    get a greedy tree and the argmax walk); any_sampled: a Python bool when every row or none
    samples (static), else a traced scalar (the sampling work runs under lax.cond only when some
    row samples). process(logits) -> the rows' processed log-probabilities. k_draft, k_verify:
    uint32[B, 2] per-row keys (a row's draws depend on its own keys only). accepted, judged:
    the row's tree-walk counts so far (the sampling shape's prior on a first draw's acceptance).
    visible: the cache positions each row attends to (default its length; 0 for idle rows).
    Returns (accepted path tokens as drafts [B, K-1], n_acc, next token, cache, valid nodes [B],
    walk steps at a node with children [B]). Like the chain, at most K entries are written
    from each row's length (writes past the cache end are dropped).
    """
    k = block_size
    q_logits = lm_logits(params, draft_block(params, cfg, anchor, cache, k, visible)[:, : k - 1])
    all_sampled = any_sampled is True

    def greedy_tree():
        return T.build_tree(anchor, jax.nn.log_softmax(q_logits, axis=-1), budget)

    def sampled_tree():
        q_lp = process(q_logits)
        # the shape values a first draw at the row's per-step acceptance so far (a prior of
        # FIRST_ACCEPT worth 8 steps); earlier cycles only, so the draws stay exact
        prior = 8.0
        first = jnp.clip((accepted + prior * T.FIRST_ACCEPT) / (judged + prior), 0.05, 0.98)
        tree = jax.vmap(lambda a, q, key, f: _unrow(T.build_tree(a[None], q[None], budget, key,
                                                                 f[None])))(
            anchor, q_lp, k_draft, first)
        return tree, q_lp

    if all_sampled:
        tree, q_lp = sampled_tree()
    elif any_sampled is False:
        tree, q_lp = greedy_tree(), None
    else:
        tree_g = greedy_tree()
        tree_s, q_lp = _branch(any_sampled, sampled_tree,
                               lambda: (tree_g, jnp.zeros(q_logits.shape, jnp.float32)))
        tree = _select_rows(sampled, tree_s, tree_g)
    hidden, new_k, new_v = ar_block(params, cfg, tree.tokens, cache, tree.depth, tree.mask,
                                    visible=visible)
    p_logits = lm_logits(params, hidden)

    def reject():
        def one(key, t, p, q):
            return _unrow(T.rejection_tree_verify(key, _row(t), p[None], q[None]))
        return jax.vmap(one)(k_verify, tree, process(p_logits), q_lp)

    if all_sampled:
        n_acc, nxt, path = reject()
    elif any_sampled is False:
        n_acc, nxt, path = T.greedy_tree_verify(tree, p_logits)
    else:
        greedy = T.greedy_tree_verify(tree, p_logits)
        n_acc, nxt, path = _select_rows(sampled, _branch(any_sampled, reject, lambda: greedy),
                                        greedy)
    idx = path[None, :, :, None, None]  # the path's K/V, consecutive from length
    cache = write_cache(cache, jnp.take_along_axis(new_k, idx, axis=2),
                        jnp.take_along_axis(new_v, idx, axis=2))
    n_valid = jnp.sum(tree.valid, axis=1).astype(jnp.int32) - 1
    end = jnp.take_along_axis(path, n_acc[:, None], axis=1)[:, 0]
    walked = n_acc + (T._take_row(tree.children, end)[:, 0] >= 0)
    return tree.path_tokens(path), n_acc, nxt, cache, n_valid, walked.astype(jnp.int32)


def loop_fn(params: Any, spec: DecodeSpec, state: DecodeState, sampling: Sampling) -> DecodeState:
    """Run step_fn until every row is done (at most max_new_tokens iterations)."""
    TRACE_COUNTS["loop"] += 1

    def cond(s):
        return jnp.any(~s.done) & (s.steps < spec.max_new_tokens)

    return jax.lax.while_loop(cond, lambda s: step_fn(params, spec, s, sampling), state)


def _traced_step(params, spec, state, sampling):
    TRACE_COUNTS["step"] += 1
    return step_fn(params, spec, state, sampling)


# the empty cache is donated: prefill writes it in place (an argument and output, not a temporary)
prefill_jit = jax.jit(prefill_fn, static_argnums=(1,), donate_argnums=(2,))


def empty_cache(spec: DecodeSpec, batch: int, prompt_bucket: int, dtype: Any) -> KVCache:
    """The zeroed cache prefill_fn fills: spec.cache_len(prompt_bucket) positions per row (on a
    mesh: a global array, rows over data and KV heads over tensor)."""
    shape = (spec.cfg, batch, spec.cache_len(prompt_bucket), jnp.dtype(dtype))
    if spec.mesh is None:
        return _empty_cache_jit(*shape)
    return _empty_cache_on(spec.mesh, *shd.cache_specs(spec.cfg, spec.mesh, batch))(*shape)


_empty_cache_jit = jax.jit(init_cache, static_argnums=(0, 1, 2, 3))


@functools.lru_cache(maxsize=None)
def _empty_cache_on(mesh: Any, kv_spec: P, len_spec: P) -> Callable[..., KVCache]:
    kv, ln = NamedSharding(mesh, kv_spec), NamedSharding(mesh, len_spec)
    return jax.jit(init_cache, static_argnums=(0, 1, 2, 3),
                   out_shardings=KVCache(k=kv, v=kv, length=ln))
# the state (KV cache included) is donated: the loop updates it in place, with no entry copy
loop_jit = jax.jit(loop_fn, static_argnums=(1,), donate_argnums=(2,))
step_jit = jax.jit(_traced_step, static_argnums=(1,), donate_argnums=(2,))


# ---------------------------------------------------------------------------------------------
# results and statistics


@dataclasses.dataclass
class GenerationStats:
    """Per-prompt statistics.

    forward_passes counts passes this row took part in while active: 1 (prefill) + 2 per orthrus
    cycle, or 1 + 1 per AR step. tpf = tokens / forward_passes (orthrus: tokens / (1 + 2 cycles)).
    acceptance_length = drafts accepted per cycle, the bonus/correction token EXCLUDED (vLLM and
    SGLang count the bonus, i.e. report ours + 1). Only emitted drafts count: in a cycle cut by
    EOS or max_new_tokens, accepted drafts past the cut are not counted. acceptance_hist[n] = cycles that accepted n
    drafts; position_acceptance[i] = cycles where draft i+1 (tree: the path's node at depth
    i+1) was accepted / cycles; nodes_per_cycle = draft tokens the AR view verified per cycle
    besides the anchor (chain: K-1; tree: the tree's real nodes, at most tree_budget). Times are the
    batch's wall clock: ttft_s = start to first token (prefill), tokens_per_s = tokens / time.
    """

    tokens: int
    forward_passes: int
    cycles: int
    tpf: float
    acceptance_length: float
    acceptance_hist: list[int]
    position_acceptance: list[float]
    nodes_per_cycle: float
    ttft_s: float
    time_s: float
    tokens_per_s: float
    finish_reason: str  # "eos" or "length"

    def short(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "forward_passes": self.forward_passes,
                "tpf": round(self.tpf, 4), "acceptance_length": round(self.acceptance_length, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "ttft_s": round(self.ttft_s, 4)}


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only, up to and including EOS
    stats: GenerationStats


def _row_stats(mode: str, n: int, cycles: int, hist: np.ndarray, pos: np.ndarray, eos: bool,
               ttft: float, elapsed: float, k: int, nodes: int = 0) -> GenerationStats:
    passes = (1 + (2 if mode == "orthrus" else 1) * cycles) if n > 0 else 0
    acc = float((hist * np.arange(len(hist))).sum() / cycles) if (cycles and mode == "orthrus") else 0.0
    return GenerationStats(
        tokens=n, forward_passes=passes, cycles=cycles, tpf=n / passes if passes else 0.0,
        acceptance_length=acc,
        acceptance_hist=[int(x) for x in hist] if mode == "orthrus" else [],
        position_acceptance=([float(x) / cycles if cycles else 0.0 for x in pos[: k - 1]]
                             if mode == "orthrus" else []),
        nodes_per_cycle=nodes / cycles if (cycles and mode == "orthrus") else 0.0,
        ttft_s=ttft, time_s=elapsed, tokens_per_s=n / elapsed if elapsed > 0 else 0.0,
        finish_reason="eos" if eos else "length")


def summarize(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """Aggregate stats over many results: sums, pooled TPF and acceptance length."""
    tokens = sum(r.stats.tokens for r in results)
    passes = sum(r.stats.forward_passes for r in results)
    cycles = sum(r.stats.cycles for r in results)
    hists = [r.stats.acceptance_hist for r in results if r.stats.acceptance_hist]
    hist = np.sum(hists, axis=0) if hists else np.zeros(0)
    accepted = float((hist * np.arange(len(hist))).sum()) if len(hist) else 0.0
    nodes = sum(r.stats.nodes_per_cycle * r.stats.cycles for r in results)
    return {"prompts": len(results), "tokens": tokens, "forward_passes": passes, "cycles": cycles,
            "tpf": tokens / passes if passes else 0.0,
            "acceptance_length": accepted / cycles if (cycles and len(hist)) else 0.0,
            "acceptance_hist": [int(x) for x in hist],
            "position_acceptance": [float(x) / cycles for x in
                                    np.sum([np.asarray(r.stats.position_acceptance) * r.stats.cycles
                                            for r in results if r.stats.position_acceptance],
                                           axis=0)] if (cycles and len(hist)) else [],
            "nodes_per_cycle": nodes / cycles if (cycles and len(hist)) else 0.0}


# ---------------------------------------------------------------------------------------------
# host-side driver


def length_bucket(n: int) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x) that holds n."""
    b = MIN_LEN_BUCKET
    while True:
        if n <= b:
            return b
        if n <= b * 3 // 2:
            return b * 3 // 2
        b *= 2


def new_bucket(n: int) -> int:
    """Output buffer length for max_new_tokens n: a power of two, at least 64 (the exact limit is
    per row and traced, so nearby max_new_tokens values share compiled code)."""
    b = 64
    while b < n:
        b *= 2
    return b


def batch_bucket(n: int, batch_size: int) -> int:
    """Smallest power of two >= n, capped at batch_size."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(batch_size, n))


def make_spec(cfg: Qwen3Config, *, mode: str = "orthrus", max_new_tokens: int = 256,
              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              block_size: int | None = None, eos_token_ids: Sequence[int] | None = None,
              verify: str = "chain", tree_budget: int | None = None,
              mesh: Any = None, prefill_chunk_size: int = PREFILL_CHUNK) -> DecodeSpec:
    if mode not in MODES:
        raise GenerationError(f"mode must be one of {MODES}, got {mode!r}")
    if verify not in VERIFY:
        raise GenerationError(f"verify must be one of {VERIFY}, got {verify!r}")
    if verify == "tree" and mode != "orthrus":
        raise GenerationError(f"verify 'tree' needs mode 'orthrus', got mode {mode!r}")
    k = int(cfg.block_size if block_size is None else block_size)
    if k < 2:
        raise GenerationError(f"block_size must be >= 2, got {k}")
    budget = k - 1 if tree_budget is None else int(tree_budget)
    if verify == "tree" and budget < 1:
        raise GenerationError(f"tree_budget must be >= 1, got {budget}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0.0
    if not greedy and not 0.0 < top_p <= 1.0:  # greedy ignores the sampling filters
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not greedy and top_k < 0:
        raise GenerationError(f"top_k must be >= 0, got {top_k}")
    if prefill_chunk_size < 1:
        raise GenerationError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
    eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    return DecodeSpec(cfg=cfg, mode=mode, block_size=k, max_new_tokens=new_bucket(max_new_tokens),
                      greedy=greedy, top_k=0 if greedy else int(top_k),
                      use_top_p=(not greedy) and top_p < 1.0,
                      eos_ids=tuple(int(e) for e in eos), verify=verify,
                      tree_budget=budget if verify == "tree" else 0, mesh=mesh,
                      prefill_chunk=int(prefill_chunk_size))


def _check_prompts(cfg: Qwen3Config, prompts: Sequence[Sequence[int]], max_new: int,
                   max_len: int | None) -> int:
    capacity = int(cfg.max_position_embeddings if max_len is None else max_len)
    if not 1 <= capacity <= cfg.max_position_embeddings:
        raise GenerationError(f"max_len must be in 1..{cfg.max_position_embeddings} (the model's "
                              f"max_position_embeddings), got {capacity}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty: at least one token is needed")
        if len(p) + max_new > capacity:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new} it needs "
                f"{len(p) + max_new} cache positions but the cache holds {capacity}")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside vocab_size "
                                  f"{cfg.vocab_size}")
    return capacity


def _pad_batch(prompts: Sequence[Sequence[int]], max_new: int, batch: int, pad_to: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = length_bucket(max(max(len(x) for x in prompts), pad_to))
    tokens = np.zeros((batch, p), np.int32)
    lens = np.ones((batch,), np.int32)
    limits = np.zeros((batch,), np.int32)
    for i, x in enumerate(prompts):
        tokens[i, : len(x)] = x
        lens[i] = len(x)
        limits[i] = max_new
    return tokens, lens, limits


class _Batch:
    """One padded batch: prefill, then either the single while_loop or a Python stepper."""

    def __init__(self, params, spec: DecodeSpec, prompts, max_new: int, batch: int,
                 sampling: Sampling, key: Array, pad_to: int = 0):
        self.params, self.spec, self.sampling, self.n = params, spec, sampling, len(prompts)
        inputs = _pad_batch(prompts, max_new, batch, pad_to)
        self.t0 = time.perf_counter()
        if spec.mesh is None:
            inputs = tuple(jnp.asarray(x) for x in inputs)
        else:  # global arrays (rows over data), so every process runs the one program
            inputs = tuple(shd.put_global(x, NamedSharding(spec.mesh, shd.row_spec(spec.mesh, x.shape)))
                           for x in inputs)
            sampling, key = jax.tree_util.tree_map(
                lambda x: shd.put_global(np.asarray(x), NamedSharding(spec.mesh, P())),
                (sampling, key))
            self.sampling = sampling
        cache = empty_cache(spec, batch, inputs[0].shape[1], params["embed"].dtype)
        self.state = prefill_jit(params, spec, cache, *inputs, sampling, key)
        self.first = shd.to_host(self.state.anchor)  # host sync: time to first token
        self.ttft = time.perf_counter() - self.t0

    def run(self) -> None:
        self.state = loop_jit(self.params, self.spec, self.state, self.sampling)

    def stream(self) -> Iterator[list[list[int]]]:
        """Yield, per cycle, each real row's newly committed tokens (the first yield: token 1)."""
        seen = np.zeros((self.n,), np.int64)
        while True:
            n_out = shd.to_host(self.state.n_out)[: self.n]
            out = shd.to_host(self.state.out)[: self.n]
            new = [out[i, seen[i]: n_out[i]].tolist() for i in range(self.n)]
            seen = n_out.astype(np.int64)
            if any(new):
                yield new
            if bool(np.all(shd.to_host(self.state.done))):
                return
            self.state = step_jit(self.params, self.spec, self.state, self.sampling)

    def results(self) -> list[GenerationResult]:
        host = jax.tree_util.tree_map(shd.to_host, {
            "out": self.state.out, "n_out": self.state.n_out, "cycles": self.state.cycles,
            "hist": self.state.acc_hist, "pos": self.state.pos_acc, "nodes": self.state.nodes})
        elapsed = time.perf_counter() - self.t0
        eos = set(self.spec.eos_ids)
        res = []
        for i in range(self.n):
            ids = host["out"][i, : host["n_out"][i]].tolist()
            stats = _row_stats(self.spec.mode, len(ids), int(host["cycles"][i]), host["hist"][i],
                               host["pos"][i], bool(ids) and ids[-1] in eos, self.ttft, elapsed,
                               self.spec.block_size, int(host["nodes"][i]))
            res.append(GenerationResult(ids, stats))
        return res


def _batches(prompts, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, stable)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def generate(params: Any, cfg: Qwen3Config, prompts: Sequence[Sequence[int]], *,
             mode: str = "orthrus", max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, block_size: int | None = None,
             batch_size: int = 32, max_len: int | None = None, pad_to: int = 0,
             eos_token_ids: Sequence[int] | None = None, verify: str = "chain",
             tree_budget: int | None = None,
             on_tokens: Callable[[int, list[int]], None] | None = None,
             mesh: Any = None, prefill_chunk_size: int = PREFILL_CHUNK) -> list[GenerationResult]:
    """Generate for a list of token-id prompts; results in prompt order.

    mode "orthrus" (diffusion draft + AR verify, K = block_size or cfg.block_size) or "ar".
    temperature 0 = greedy; otherwise sampling with top_k (0 = off) and top_p (1 = off), with
    exact rejection sampling in orthrus mode. Prompts are sorted by length and run in batches of
    at most batch_size rows (padded to power-of-two row counts and bucketed lengths). max_len is
    the cache capacity (default cfg.max_position_embeddings): prompt + max_new_tokens must fit.
    pad_to raises the padded prompt length to at least this bucket (fewer distinct compiles).
    eos_token_ids defaults to cfg.eos_token_ids. Prompts enter the cache in chunks of
    prefill_chunk_size tokens (prefill temporaries grow with the chunk, not the prompt). verify "tree" (orthrus mode) verifies a draft
    tree of tree_budget nodes per cycle (default K-1, the chain's count) instead of the chain of
    K-1 drafts (orthrus_jax.tree). on_tokens(prompt_index, new_ids) streams tokens
    per cycle (a Python stepper over the same jitted step); without it each batch is one
    while_loop call. mesh (orthrus_jax.sharding.inference_mesh) runs each batch as one program
    over it, rows split over data (batches padded to a multiple of its size), heads over
    tensor; params must already be placed on it (load_any_model(..., mesh, inference=True) or
    orthrus_jax.sharding.place_params).
    """
    spec = make_spec(cfg, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, block_size=block_size, eos_token_ids=eos_token_ids,
                     verify=verify, tree_budget=tree_budget, mesh=mesh,
                     prefill_chunk_size=prefill_chunk_size)
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [list(map(int, p)) for p in prompts]
    _check_prompts(cfg, prompts, max_new_tokens, max_len)
    sampling = Sampling.make(temperature, top_p)
    results: list[GenerationResult | None] = [None] * len(prompts)
    base_key = jax.random.PRNGKey(seed)
    for bi, idx in enumerate(_batches(prompts, batch_size)):
        if max_new_tokens == 0:
            for i in idx:
                results[i] = GenerationResult([], _row_stats(mode, 0, 0, np.zeros(1), np.zeros(1),
                                                             False, 0.0, 0.0, spec.block_size))
            continue
        rows = batch_bucket(len(idx), batch_size)
        if mesh is not None:
            rows = -(-rows // mesh.shape["data"]) * mesh.shape["data"]
        batch = _Batch(params, spec, [prompts[i] for i in idx], max_new_tokens, rows, sampling,
                       jax.random.fold_in(base_key, bi), pad_to)
        if on_tokens is None:
            batch.run()
        else:
            for new in batch.stream():
                for row, ids in enumerate(new):
                    if ids:
                        on_tokens(idx[row], ids)
        for i, r in zip(idx, batch.results()):
            results[i] = r
    return results  # type: ignore[return-value]
