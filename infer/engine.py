"""Continuous batching over S slots of one static KV cache (JetStream style: insert, then generate).

    eng = Engine(params, cfg, slots=8, max_len=1024, mode="orthrus")
    req = eng.submit(Request([ids...], max_new_tokens=64, temperature=0.7, top_p=0.8, top_k=20,
                             seed=1, on_tokens=callback))
    while eng.has_work():
        eng.run_once()

Device side (pure functions, jitted once per EngineSpec):

- `insert_chunk`: prefills up to `chunk` prompt tokens of one request into its slot's rows of the
  cache (an AR pass over the slot's cache row at an explicit start); the last chunk samples the
  first token and makes the slot active. A long prompt enters chunk by chunk between decode
  steps, so running streams keep flowing while it is prefilled.
- `generate`: up to `steps` cycles (orthrus: draft + verify of a chain, or with verify="tree" of
  a draft tree of tree_budget nodes through infer.decoder.tree_cycle; ar: one token) of every
  active slot
  in one `lax.while_loop`, stopping early as soon as a slot finishes, so its slot is refilled at
  once (a quarter of them while a slot is free or a long prompt is being prefilled: the limit
  is traced). The cycles run on the first `rows` slots only, a power of two covering every
  active slot (requests take the lowest free slot): a cycle's cost follows the occupancy, not
  the engine's size (one compile per row bucket). Returns those slots' new tokens.

Host loop (`Engine.run_once`): free cancelled slots, admit, advance every prefilling slot by one
chunk (a wave of short prompts enters in one step, so the cycles after it run with every slot
busy), then one generate call; one host sync per call.

Per-request temperature, top-p, top-k and seed are per-slot traced values: one compiled program
serves mixed settings (greedy rows by argmax, sampled rows through spec.process_logits_rows with
top-k up to a static cap; the sampling work is skipped when no active row samples). A cycle's
PRNG key is fold_in(request key, position of the last committed token): the same seed gives the
same tokens in whichever slot the request lands (tree drafts and their rejection walk take per-row
keys too). An inactive slot is "parked" with length = max_len, so the batched passes' writes for
it fall outside the cache and are dropped. A tree needs no more cache than the chain: its nodes'
K/V stay out of the cache except the accepted path's (at most K entries from the slot's length,
like the chain's block), and entries past max_len belong to tokens max_new_tokens cuts anyway.
Per-slot statistics (cycles, acceptance histogram, per-depth acceptance, nodes verified, tree
walk counts) are reset when a request is inserted.

On a device mesh (orthrus_jax.sharding.inference_mesh: --tensor-parallel-size and
--data-parallel-size) every program is one SPMD program over the mesh: weights by the inference
rules (whole heads and the MLP over "tensor"), the slot cache over KV heads ("tensor", when they
divide) and slots ("data"), every per-slot array over slots. Host inputs enter as global arrays
and results leave through orthrus_jax.sharding.to_host, so with several processes
(jax.distributed) each one runs the same host loop on the same values.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from infer.decoder import (MODES, TRACE_COUNTS, VERIFY, GenerationError, GenerationResult,
                           _check_prompts, _row_stats, length_bucket, tree_cycle)
from orthrus_jax import sharding as shd
from orthrus_jax import spec as S
from orthrus_jax.cache import KVCache, init_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.model import (PREFILL_CHUNK, ar_forward, draft_block, lm_logits,
                                prefill_forward)

Array = jax.Array
TOP_K_CAP = 256  # largest top_k served (one lax.top_k of this width per sampled pass)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Static engine settings (hashable): everything that fixes shapes or code paths."""

    cfg: Qwen3Config
    mode: str = "orthrus"
    block_size: int = 32
    slots: int = 8
    max_len: int = 1024
    steps: int = 8  # cycles per generate call, at most
    chunk: int = PREFILL_CHUNK  # prefill chunk, at most
    top_k_cap: int = TOP_K_CAP
    eos_ids: tuple[int, ...] = ()
    verify: str = "chain"  # orthrus: "chain" (K-1 drafts) or "tree" (tree_budget nodes)
    tree_budget: int = 0  # draft nodes per cycle besides the anchor (verify="tree")
    mesh: Any = None  # an inference mesh: slots over "data", heads and MLP over "tensor"

    @property
    def nodes(self) -> int:
        """Draft tokens the AR view verifies per cycle besides the anchor, at most."""
        if self.mode != "orthrus":
            return 0
        return self.tree_budget if self.verify == "tree" else self.block_size - 1

    @property
    def k(self) -> int:
        """Tokens per pass: K (orthrus) or 1 (ar)."""
        return self.block_size if self.mode == "orthrus" else 1


@flax.struct.dataclass
class SlotState:
    cache: KVCache     # length[s] = committed positions; max_len for an inactive (parked) slot
    anchor: Array      # int32[S]: last emitted token, not yet in the cache
    active: Array      # bool[S]: decoding
    n_out: Array       # int32[S]: tokens emitted for the slot's request
    max_new: Array     # int32[S]
    temperature: Array  # float32[S]: 0 = greedy
    top_p: Array       # float32[S]: 1 = off
    top_k: Array       # int32[S]: 0 = off
    key: Array         # uint32[S, 2]: the request's key (from its seed)
    cycles: Array      # int32[S]: cycles while active
    acc_hist: Array    # int32[S, K]: cycles by accepted-and-emitted drafts
    pos_acc: Array     # int32[S, max(K-1, 1)]: cycles where draft i was accepted and emitted
    nodes: Array       # int32[S]: draft nodes verified (tree: valid nodes; chain: K-1 a cycle)
    judged: Array      # int32[S]: tree walk steps at a node with children (accepted or not)
    accepted: Array    # int32[S]: drafts accepted (tree: walk steps that accepted a child)


@flax.struct.dataclass
class StepOut:
    tokens: Array      # int32[S, steps * K]: new tokens, n_new[s] of them per slot
    n_new: Array       # int32[S]
    finished: Array    # bool[S]: finished in this call (EOS or max_new_tokens)
    steps: Array       # int32[]: cycles run


def state_shardings(spec: EngineSpec, state: SlotState) -> Any:
    """NamedShardings of a SlotState on spec.mesh: the cache over slots (data) and KV heads
    (tensor), every per-slot array over slots."""
    kv, length = shd.cache_specs(spec.cfg, spec.mesh, spec.slots)
    rows = {f.name: NamedSharding(spec.mesh, shd.row_spec(spec.mesh, getattr(state, f.name).shape))
            for f in dataclasses.fields(state) if f.name != "cache"}
    on = lambda pspec: NamedSharding(spec.mesh, pspec)  # noqa: E731
    return state.replace(cache=state.cache.replace(k=on(kv), v=on(kv), length=on(length)), **rows)


def _constrain(spec: EngineSpec, state: SlotState) -> SlotState:
    if spec.mesh is None:
        return state
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, state,
                                  state_shardings(spec, state))


def init_state_fn(spec: EngineSpec, dtype: Any) -> SlotState:
    s, k = spec.slots, spec.block_size
    cache = init_cache(spec.cfg, s, spec.max_len, dtype)
    zi = jnp.zeros((s,), jnp.int32)
    return _constrain(spec, SlotState(
        cache=cache.replace(length=jnp.full((s,), spec.max_len, jnp.int32)), anchor=zi,
        active=jnp.zeros((s,), bool), n_out=zi, max_new=zi, temperature=jnp.zeros((s,)),
        top_p=jnp.ones((s,)), top_k=zi, key=jnp.zeros((s, 2), jnp.uint32), cycles=zi,
        acc_hist=jnp.zeros((s, k), jnp.int32), pos_acc=jnp.zeros((s, max(k - 1, 1)), jnp.int32),
        nodes=zi, judged=zi, accepted=zi))


def _processed(spec: EngineSpec, state: SlotState, logits: Array) -> Array:
    return S.process_logits_rows(logits, state.temperature, state.top_p, state.top_k,
                                 top_k_cap=spec.top_k_cap)


def _sample_rows(keys: Array, logprobs: Array) -> Array:
    return jax.vmap(S.sample_tokens)(keys, logprobs)


def _pick(spec: EngineSpec, state: SlotState, keys: Array, logits: Array,
          any_sampled: Array, any_greedy: Array) -> Array:
    """One token per row from logits [S, V]: argmax for greedy rows, else sampled (each part
    skipped when no row needs it)."""
    greedy = _argmax_if(any_greedy, logits)
    sampled = jax.lax.cond(any_sampled,
                           lambda: _sample_rows(keys, _processed(spec, state, logits)),
                           lambda: greedy)
    return jnp.where(state.temperature > 0, sampled, greedy)


def _argmax_if(needed: Array, logits: Array) -> Array:
    """argmax over the last axis (int32), or zeros when `needed` is false (no greedy row: the
    argmax over the vocabulary is skipped)."""
    return jax.lax.cond(needed, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        lambda: jnp.zeros(logits.shape[:-1], jnp.int32))


def _eos(spec: EngineSpec, tokens: Array) -> Array:
    hit = jnp.zeros(tokens.shape, bool)
    for e in spec.eos_ids:
        hit = hit | (tokens == e)
    return hit


def _prefill_rows(params: Any, spec: EngineSpec, k: Array, v: Array, tokens: Array, slot: Array,
                  start: Array, n_valid: Array, write: Any = True) -> tuple[Array, Array, Array]:
    """Prefill tokens [1, C] into row `slot` of k/v [layers, slots, ...] (the row is kept as it
    was where `write` is false): (k, v, hidden of the last valid token [1, D])."""
    old_k = jax.lax.dynamic_slice_in_dim(k, slot, 1, axis=1)
    old_v = jax.lax.dynamic_slice_in_dim(v, slot, 1, axis=1)
    row = KVCache(k=old_k, v=old_v, length=start.reshape(1).astype(jnp.int32))
    last, row = prefill_forward(params, spec.cfg, tokens, row, (n_valid - 1).reshape(1))
    k = jax.lax.dynamic_update_slice_in_dim(k, jnp.where(write, row.k, old_k), slot, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(v, jnp.where(write, row.v, old_v), slot, axis=1)
    return k, v, last


def _prefill_slot(params: Any, spec: EngineSpec, k: Array, v: Array, tokens: Array,
                  slot: Array, start: Array, n_valid: Array) -> tuple[Array, Array, Array]:
    """_prefill_rows; with slots split over a data axis, inside a shard_map over it: each data
    group works on its own slots (the owner writes its row, the others keep theirs) and the
    owner's hidden state is summed over the groups. A global slice of the cache at a traced slot
    would gather the whole cache onto every device."""
    mesh = spec.mesh
    if mesh is None or mesh.shape["data"] == 1:
        return _prefill_rows(params, spec, k, v, tokens, slot, start, n_valid)

    def local(params, k, v, tokens, slot, start, n_valid):
        n = k.shape[1]
        loc = slot - jax.lax.axis_index("data") * n
        mine = (loc >= 0) & (loc < n)
        k, v, last = _prefill_rows(params, spec, k, v, tokens, jnp.clip(loc, 0, n - 1), start,
                                   n_valid, write=mine)
        return k, v, jax.lax.psum(jnp.where(mine, last, 0).astype(jnp.float32), "data")

    rows = P(None, "data")
    k, v, last = jax.shard_map(
        local, mesh=mesh, axis_names={"data"}, check_vma=False,
        in_specs=(P(), rows, rows, P(), P(), P(), P()), out_specs=(rows, rows, P()))(
            params, k, v, tokens, slot, start, n_valid)
    return k, v, last.astype(params["embed"].dtype)


def insert_chunk_fn(params: Any, spec: EngineSpec, state: SlotState, tokens: Array, slot: Array,
                    start: Array, n_valid: Array, final: Array, req: dict[str, Array]
                    ) -> tuple[SlotState, Array, Array]:
    """Prefill tokens [1, C] (n_valid real) at positions start.. of `slot`'s cache row.

    On the final chunk, sample the first token with the request's settings (req: max_new,
    temperature, top_p, top_k, key) and activate the slot (unless that token already ends it).
    Returns (state, first token, done at the first token).
    """
    TRACE_COUNTS["insert"] += 1
    c = state.cache
    k, v, last = _prefill_slot(params, spec, c.k, c.v, tokens, slot, start, n_valid)
    cache = c.replace(k=k, v=v)
    one = state.replace(temperature=req["temperature"][None], top_p=req["top_p"][None],
                        top_k=req["top_k"][None])
    prompt_len = (start + n_valid).astype(jnp.int32)
    key = jax.random.fold_in(req["key"], prompt_len - 1)[None]
    first = _pick(spec, one, key, lm_logits(params, last), req["temperature"] > 0,
                  req["temperature"] <= 0)[0]
    done = _eos(spec, first) | (req["max_new"] <= 1)

    def put(arr: Array, value: Any) -> Array:
        return arr.at[slot].set(jnp.where(final, jnp.asarray(value, arr.dtype), arr[slot]))

    state = state.replace(
        cache=cache.replace(length=put(c.length, jnp.where(done, spec.max_len, prompt_len))),
        anchor=put(state.anchor, first), active=put(state.active, ~done),
        n_out=put(state.n_out, 1), max_new=put(state.max_new, req["max_new"]),
        temperature=put(state.temperature, req["temperature"]),
        top_p=put(state.top_p, req["top_p"]), top_k=put(state.top_k, req["top_k"]),
        key=put(state.key, req["key"]), cycles=put(state.cycles, 0),
        acc_hist=put(state.acc_hist, 0), pos_acc=put(state.pos_acc, 0),
        nodes=put(state.nodes, 0), judged=put(state.judged, 0), accepted=put(state.accepted, 0))
    return _constrain(spec, state), first, done


def cycle_fn(params: Any, spec: EngineSpec, state: SlotState
             ) -> tuple[SlotState, Array, Array, Array]:
    """One cycle of every active slot. Returns (state, block [S, K], n_emit [S], finished [S])."""
    cfg, cache = spec.cfg, state.cache
    keys = jax.vmap(jax.random.fold_in)(state.key, cache.length)
    sub = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    k_draft, k_verify = sub[:, 0], sub[:, 1]
    sampled = state.temperature > 0
    any_sampled = jnp.any(sampled & state.active)
    any_greedy = jnp.any(~sampled & state.active)
    n_nodes = jnp.full(state.anchor.shape, spec.nodes, jnp.int32)
    judged = jnp.zeros_like(n_nodes)
    # idle slots (parked at max_len, or still prefilling) read no cache: only the active slots'
    # lengths set how many key chunks the passes loop over
    visible = jnp.where(state.active, cache.length, 0)
    if spec.mode == "orthrus" and spec.verify == "tree":
        drafts, n_acc, nxt, cache, n_nodes, judged = tree_cycle(
            params, cfg, spec.block_size, spec.tree_budget, state.anchor, cache, sampled=sampled,
            any_sampled=any_sampled, process=lambda logits: _processed(spec, state, logits),
            k_draft=k_draft, k_verify=k_verify, accepted=state.accepted, judged=state.judged,
            visible=visible)
    elif spec.mode == "orthrus":
        k = spec.block_size
        q_logits = lm_logits(params, draft_block(params, cfg, state.anchor, cache, k,
                                                 visible)[:, : k - 1])
        greedy_d = _argmax_if(any_greedy, q_logits)

        def sample_drafts():
            q_lp = _processed(spec, state, q_logits)
            return _sample_rows(k_draft, q_lp), q_lp

        drafts_s, q_lp = jax.lax.cond(any_sampled, sample_drafts,
                                      lambda: (greedy_d, jnp.zeros(q_logits.shape, jnp.float32)))
        drafts = jnp.where(sampled[:, None], drafts_s, greedy_d)
        block_in = jnp.concatenate([state.anchor[:, None], drafts], axis=1)
        hidden, cache = ar_forward(params, cfg, block_in, cache, visible=visible)
        p_logits = lm_logits(params, hidden)
        n_g, nxt_g = jax.lax.cond(any_greedy, lambda: S.greedy_verify(drafts, p_logits),
                                  lambda: (jnp.zeros_like(state.anchor),) * 2)

        def reject():
            one = jax.vmap(lambda kk, d, p, q: S.rejection_verify(kk, d[None], p[None], q[None]))
            n, nxt = one(k_verify, drafts, _processed(spec, state, p_logits), q_lp)
            return n[:, 0], nxt[:, 0]

        n_s, nxt_s = jax.lax.cond(any_sampled, reject, lambda: (n_g, nxt_g))
        n_acc = jnp.where(sampled, n_s, n_g)
        nxt = jnp.where(sampled, nxt_s, nxt_g)
    else:
        hidden, cache = ar_forward(params, cfg, state.anchor[:, None], cache, visible=visible)
        nxt = _pick(spec, state, k_verify, lm_logits(params, hidden[:, 0]), any_sampled,
                    any_greedy)
        drafts = jnp.zeros((state.anchor.shape[0], 0), jnp.int32)
        n_acc = jnp.zeros_like(nxt)
    block, n_emit, finished = S.commit_block(drafts, n_acc, nxt, state.n_out, state.max_new,
                                             spec.eos_ids)
    active = state.active
    n_emit = jnp.where(active, n_emit, 0)
    finished = active & finished
    new_anchor = jnp.take_along_axis(block, jnp.maximum(n_emit - 1, 0)[:, None], axis=1)[:, 0]
    length = jnp.where(active, cache.length + n_acc + 1, cache.length)
    length = jnp.where(finished, spec.max_len, length)  # park: later writes are dropped
    n_kept = jnp.minimum(n_acc, n_emit)
    kk = state.acc_hist.shape[1]
    hist = state.acc_hist + (active[:, None] & (jnp.arange(kk)[None, :] == n_kept[:, None]))
    pos = state.pos_acc + (active[:, None]
                           & (jnp.arange(state.pos_acc.shape[1])[None, :] < n_kept[:, None]))
    state = state.replace(
        cache=cache.replace(length=length.astype(jnp.int32)),
        anchor=jnp.where(active, new_anchor, state.anchor), active=active & ~finished,
        n_out=state.n_out + n_emit, cycles=state.cycles + active.astype(jnp.int32),
        acc_hist=hist.astype(jnp.int32), pos_acc=pos.astype(jnp.int32),
        nodes=state.nodes + jnp.where(active, n_nodes, 0),
        judged=state.judged + jnp.where(active, judged, 0),
        accepted=state.accepted + jnp.where(active, n_acc, 0))
    return _constrain(spec, state), block, n_emit, finished


def generate_fn(params: Any, spec: EngineSpec, state: SlotState, limit: Array,
                rows: int | None = None) -> tuple[SlotState, StepOut]:
    """Up to `limit` (traced, <= spec.steps) cycles in one while_loop; stops early once any slot
    finishes. rows (static): run the cycles on slots [0, rows) only (every active slot must lie
    there): a cycle's cost follows the occupied slots, not the engine's size. StepOut covers
    those rows."""
    TRACE_COUNTS["generate"] += 1
    rows = spec.slots if rows is None else rows
    full = state
    if rows < spec.slots:  # one copy of the rows in and out per call, not per cycle
        state = _rows(state, 0, rows)
    s, width = rows, spec.steps * spec.k
    out = StepOut(tokens=jnp.zeros((s, width), jnp.int32), n_new=jnp.zeros((s,), jnp.int32),
                  finished=jnp.zeros((s,), bool), steps=jnp.int32(0))

    def cond(carry):
        st, o = carry
        return (o.steps < jnp.minimum(limit, spec.steps)) & jnp.any(st.active) \
            & ~jnp.any(o.finished)

    def body(carry):
        st, o = carry
        st, block, n_emit, finished = cycle_fn(params, spec, st)
        toks = jax.vmap(lambda b, x, p: jax.lax.dynamic_update_slice(b, x, (p,)))(
            o.tokens, block[:, : spec.k], o.n_new)
        return st, StepOut(tokens=toks, n_new=o.n_new + n_emit, finished=o.finished | finished,
                           steps=o.steps + 1)

    state, out = jax.lax.while_loop(cond, body, (state, out))
    if rows < spec.slots:
        state = _put_rows(full, state)
    return state, out


def _slot_axis(path: Any) -> int:
    """The slot axis of a SlotState leaf: 1 for the cache's k/v [layers, S, ...], else 0."""
    names = [getattr(k, "name", None) for k in path]
    return 1 if names[-1] in ("k", "v") and "cache" in names else 0


def _rows(state: SlotState, start: int, n: int) -> SlotState:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.slice_in_dim(x, start, start + n, axis=_slot_axis(path)), state)


def _put_rows(full: SlotState, part: SlotState) -> SlotState:
    return jax.tree_util.tree_map_with_path(
        lambda path, x, y: jax.lax.dynamic_update_slice_in_dim(x, y, 0, axis=_slot_axis(path)),
        full, part)


def row_bucket(n: int, slots: int) -> int:
    """Rows a generate call runs: the next power of two >= n, at most slots (few compiles)."""
    return min(_power_of_two_at_least(n), slots)


def release_fn(spec: EngineSpec, state: SlotState, mask: Array) -> SlotState:
    """Deactivate and park the slots in mask (cancelled requests)."""
    c = state.cache
    return _constrain(spec, state.replace(
        active=state.active & ~mask, cache=c.replace(length=jnp.where(mask, spec.max_len,
                                                                        c.length))))


init_state_jit = jax.jit(init_state_fn, static_argnums=(0, 1))
insert_jit = jax.jit(insert_chunk_fn, static_argnums=(1,), donate_argnums=(2,))
generate_jit = jax.jit(generate_fn, static_argnums=(1, 4), donate_argnums=(2,))
release_jit = jax.jit(release_fn, static_argnums=(0,), donate_argnums=(1,))


# ---------------------------------------------------------------------------------------------
# host side


def _power_of_two_at_least(n: int, least: int = 1) -> int:
    """The smallest power of two >= n, starting from `least` (a power of two)."""
    w = least
    while w < n:
        w *= 2
    return w


def chunk_width(n: int) -> int:
    """Padded width of a prefill chunk of n tokens: a power of two, at least 32 (few compiles)."""
    return _power_of_two_at_least(n, 32)


def seed_key(seed: int) -> np.ndarray:
    """The threefry key jax.random.PRNGKey(seed) gives, for any 64-bit seed (taken mod 2**64)."""
    seed %= 1 << 64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress. on_tokens(request, new_ids) and
    on_finish(request) are called from the engine's thread."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    on_tokens: Callable[["Request", list[int]], None] | None = None
    on_finish: Callable[["Request"], None] | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled", "error"
    slot: int | None = None
    prefilled: int = 0
    cancel_requested: bool = False
    cancel_step: int | None = None  # the engine's step count when cancel() was called
    t_submit: float = 0.0
    t_first: float | None = None
    t_end: float | None = None
    cycles: int = 0
    acc_hist: np.ndarray | None = None
    pos_acc: np.ndarray | None = None
    nodes: int = 0  # draft nodes verified for this request

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Host driver: admission, chunked insert, generate calls, delivery, freeing.

    Thread use: submit() and cancel() may be called from any thread; run_once() from one.
    """

    def __init__(self, params: Any, cfg: Qwen3Config, *, slots: int = 8, max_len: int = 1024,
                 mode: str = "orthrus", block_size: int | None = None, steps: int | None = None,
                 chunk: int = PREFILL_CHUNK, top_k_cap: int = TOP_K_CAP,
                 eos_token_ids: Sequence[int] | None = None, verify: str = "chain",
                 tree_budget: int | None = None, mesh: Any = None):
        """mesh: an inference mesh (orthrus_jax.sharding.inference_mesh) with params already
        placed on it (load_any_model(..., mesh, inference=True) or sharding.place_params)."""
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
        if slots < 1:
            raise GenerationError(f"slots must be >= 1, got {slots}")
        if not 1 <= max_len <= cfg.max_position_embeddings:
            raise GenerationError(f"max_len must be in 1..{cfg.max_position_embeddings} (the "
                                  f"model's max_position_embeddings), got {max_len}")
        if chunk < 1:
            raise GenerationError(f"prefill chunk size must be >= 1, got {chunk}")
        if mesh is not None:
            shd.check_tensor_heads(cfg, mesh.shape["tensor"])
            if slots % mesh.shape["data"]:
                raise GenerationError(f"slots ({slots}) must be divisible by the data parallel "
                                      f"size ({mesh.shape['data']})")
        eos = tuple(int(e) for e in (cfg.eos_token_ids if eos_token_ids is None
                                     else eos_token_ids))
        steps = steps or (8 if mode == "orthrus" else 16)
        self.spec = EngineSpec(cfg=cfg, mode=mode, block_size=k, slots=slots, max_len=max_len,
                               steps=steps, chunk=chunk, top_k_cap=top_k_cap, eos_ids=eos,
                               verify=verify, tree_budget=budget if verify == "tree" else 0,
                               mesh=mesh)
        self.params, self.cfg = params, cfg
        self.state = init_state_jit(self.spec, params["embed"].dtype)
        self.slots: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()
        self.step_count = 0  # generate calls
        self.cycle_count = 0
        self.cancel_steps: list[int] = []  # per cancelled request: steps from cancel to free

    def _put(self, tree: Any) -> Any:
        """Host inputs of a program: as they are on one device, replicated global arrays on a
        mesh (every process passes the same values)."""
        if self.spec.mesh is None:
            return tree
        rep = NamedSharding(self.spec.mesh, P())
        return jax.tree_util.tree_map(lambda x: shd.put_global(np.asarray(x), rep), tree)

    @staticmethod
    def _get(tree: Any) -> Any:
        """Program outputs in host memory (gathered across processes where needed)."""
        return jax.tree_util.tree_map(shd.to_host, tree)

    # -- requests ------------------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Raise GenerationError (one line) if the request cannot be served."""
        n, cap = len(req.prompt), self.spec.max_len
        if n == 0:
            raise GenerationError("the prompt is empty: at least one token is needed")
        bad = [t for t in req.prompt if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary "
                                  f"(0..{self.cfg.vocab_size - 1})")
        if req.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if n + req.max_new_tokens > cap:
            raise GenerationError(
                f"the prompt has {n} tokens; with max_new_tokens={req.max_new_tokens} it needs "
                f"{n + req.max_new_tokens} cache positions but the cache holds {cap}")
        if not req.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {req.temperature}")
        if req.temperature == 0:
            return  # greedy ignores the sampling filters
        if not 0.0 < req.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {req.top_p}")
        if req.top_k < 0 or (self.spec.top_k_cap < req.top_k < self.cfg.vocab_size):
            raise GenerationError(f"top_k must be in 0..{self.spec.top_k_cap} (0 = off) or at "
                                  f"least the vocabulary size, got {req.top_k}")

    def submit(self, req: Request) -> Request:
        self.check(req)
        req.prompt = [int(t) for t in req.prompt]
        if req.temperature == 0 or req.top_k >= self.cfg.vocab_size:
            req.top_k = 0
        if req.temperature == 0:
            req.top_p = 1.0
        if req.seed is None:
            req.seed = int(np.random.randint(0, 2 ** 31 - 1))
        req.t_submit = time.perf_counter()
        with self.lock:
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request: its slot is freed before the engine's next generate call."""
        if not req.cancel_requested:
            req.cancel_step = self.step_count
            req.cancel_requested = True

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def warmup(self) -> None:
        """Compile (or load from the persistent cache) every program the engine runs: insert at
        each chunk width, generate at each row bucket, release. Leaves the engine empty."""
        w, widths = 32, []
        while w < self.spec.chunk:
            widths.append(w)
            w *= 2
        widths.append(self.spec.chunk)  # the widths _insert_chunk uses
        for w in widths:
            n = min(w, self.spec.max_len - 1)
            self.submit(Request([0] * n, 1))
        self.submit(Request([0], min(2, self.spec.max_len - 1)))
        while self.has_work():
            self.run_once()
        if self.spec.mesh is None:  # each row bucket's generate (no slot is active: no cycle)
            for r in sorted({row_bucket(n, self.spec.slots)
                             for n in range(1, self.spec.slots + 1)}):
                self.state, _ = generate_jit(self.params, self.spec, self.state, np.int32(0), r)
        self.state = release_jit(self.spec, self.state,
                                 self._put(np.zeros((self.spec.slots,), bool)))
        self.step_count = self.cycle_count = 0

    def fail_all(self) -> None:
        """After an engine error: every request in flight or waiting ends with "error", and the
        device state starts afresh."""
        with self.lock:
            reqs = list(self.waiting) + [r for r in self.slots if r is not None]
            self.waiting.clear()
        self.slots = [None] * self.spec.slots
        self.state = init_state_jit(self.spec, self.params["embed"].dtype)
        for r in reqs:
            self._finish(r, "error")

    # -- the loop ------------------------------------------------------------------------------

    def run_once(self) -> None:
        """Free cancelled slots, admit waiting requests, advance every prefilling slot by one
        chunk (all chunks while nothing decodes), then one generate call if any slot is active.

        A wave of short prompts enters in one step (requests admitted while it is prefilled
        join it), so the decode cycles that follow run with every slot busy; a long prompt
        still enters one chunk per step while the others decode."""
        self._free_cancelled()
        advanced: set[int] = set()  # requests given a chunk in this round
        while True:
            self._admit()  # requests arriving during the prefills join this step
            pending = [r for r in self.slots if r is not None and r.prefilled < len(r.prompt)]
            todo = [r for r in pending if r.id not in advanced]
            if not todo:
                if pending and not self._decoding():
                    advanced.clear()  # nothing decodes: the next chunks at once
                    continue
                break
            r = min(todo, key=lambda r: r.t_submit)
            advanced.add(r.id)
            self._deliver_first(self._insert_chunk(r))
        if self._decoding():
            self._generate()

    def _decoding(self) -> bool:
        return any(r is not None and r.prefilled >= len(r.prompt) for r in self.slots)

    def _free_cancelled(self) -> None:
        with self.lock:
            dropped = [r for r in self.waiting if r.cancel_requested]
            for r in dropped:
                self.waiting.remove(r)
        for r in dropped:
            self._finish(r, "cancelled")
        mask = np.zeros((self.spec.slots,), bool)
        for s, r in enumerate(self.slots):
            if r is not None and r.cancel_requested:
                mask[s] = r.prefilled >= len(r.prompt)  # a slot still prefilling is parked
                self.slots[s] = None
                self.cancel_steps.append(self.step_count - (r.cancel_step or 0))
                self._finish(r, "cancelled")
        if mask.any():
            self.state = release_jit(self.spec, self.state, self._put(mask))

    def _admit(self) -> None:
        with self.lock:
            for s in range(self.spec.slots):
                if self.slots[s] is None and self.waiting:
                    r = self.waiting.popleft()
                    r.slot, r.prefilled = s, 0
                    self.slots[s] = r

    def _insert_chunk(self, r: Request) -> list[tuple[Request, Array, Array]]:
        """Dispatch one prefill chunk of r; [(r, first token, done)] on its final chunk."""
        n, start = len(r.prompt), r.prefilled
        take = min(n - start, self.spec.chunk)
        width = min(chunk_width(take), self.spec.chunk)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :take] = r.prompt[start: start + take]
        final = start + take == n
        req = {"max_new": np.int32(r.max_new_tokens), "temperature": np.float32(r.temperature),
               "top_p": np.float32(r.top_p), "top_k": np.int32(r.top_k),
               "key": seed_key(int(r.seed or 0))}
        self.state, first, done = insert_jit(self.params, self.spec, self.state, *self._put(
            (tokens, np.int32(r.slot), np.int32(start), np.int32(take), np.bool_(final), req)))
        r.prefilled = start + take
        return [(r, first, done)] if final else []

    def _deliver_first(self, firsts: list[tuple[Request, Array, Array]]) -> None:
        """Deliver the first tokens of the requests whose prefill ended; free the slots that
        their first token already finished."""
        if not firsts:
            return
        got = self._get([(f, d) for _, f, d in firsts])
        now = time.perf_counter()
        for (r, _, _), (first, done) in zip(firsts, got):
            first = int(first)
            r.t_first = now
            self._deliver(r, [first])
            if bool(done):
                self.slots[r.slot] = None
                self._finish(r, "stop" if first in self.spec.eos_ids else "length")

    def _generate(self) -> None:
        # a quarter of the cycles while a slot is free or a long prompt enters chunk by chunk:
        # a request arriving meanwhile (or the prompt's next chunk) enters sooner. With every
        # slot busy, full steps: waiting requests can only enter when a slot finishes, and a
        # finishing slot ends the call anyway.
        short = any(r is None or r.prefilled < len(r.prompt) for r in self.slots)
        limit = max(1, self.spec.steps // 4) if short else self.spec.steps
        top = max(s for s, r in enumerate(self.slots)
                  if r is not None and r.prefilled >= len(r.prompt))
        # on a mesh every call runs all slots (a prefix of rows split over data would move)
        rows = row_bucket(top + 1, self.spec.slots) if self.spec.mesh is None else None
        self.state, out = generate_jit(self.params, self.spec, self.state,
                                       self._put(np.int32(limit)), rows)
        host = self._get({"tokens": out.tokens, "n_new": out.n_new, "finished": out.finished,
                          "steps": out.steps, "cycles": self.state.cycles,
                          "hist": self.state.acc_hist, "pos": self.state.pos_acc,
                          "nodes": self.state.nodes})  # one host sync per call
        self.step_count += 1
        self.cycle_count += int(host["steps"])
        for s, r in enumerate(self.slots):  # every decoding slot lies in [0, rows)
            if r is None or r.prefilled < len(r.prompt):
                continue
            n = int(host["n_new"][s])
            if n:
                self._deliver(r, host["tokens"][s, :n].tolist())
            if host["finished"][s]:
                r.cycles = int(host["cycles"][s])
                r.acc_hist, r.pos_acc = host["hist"][s].copy(), host["pos"][s].copy()
                r.nodes = int(host["nodes"][s])
                self.slots[s] = None
                eos = bool(r.tokens) and r.tokens[-1] in self.spec.eos_ids
                self._finish(r, "stop" if eos else "length")

    def _deliver(self, r: Request, ids: list[int]) -> None:
        r.tokens.extend(ids)
        if r.on_tokens is not None and not r.cancel_requested:
            r.on_tokens(r, ids)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.t_end = reason, time.perf_counter()
        if r.on_finish is not None:
            r.on_finish(r)

    def result(self, r: Request) -> GenerationResult:
        """A finished request as infer.decoder's GenerationResult (the same statistics)."""
        k = self.spec.block_size
        hist = r.acc_hist if r.acc_hist is not None else np.zeros(k, np.int64)
        pos = r.pos_acc if r.pos_acc is not None else np.zeros(max(k - 1, 1), np.int64)
        ttft = (r.t_first - r.t_submit) if r.t_first is not None else 0.0
        elapsed = (r.t_end or time.perf_counter()) - r.t_submit
        return GenerationResult(list(r.tokens), _row_stats(
            self.spec.mode, len(r.tokens), r.cycles, hist, pos, r.finish_reason == "stop",
            ttft, elapsed, k, nodes=r.nodes))


def generate_all(params: Any, cfg: Qwen3Config, prompts: Sequence[Sequence[int]], *,
                 mode: str = "orthrus", max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 block_size: int | None = None, slots: int = 8, max_len: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, verify: str = "chain",
                 tree_budget: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 mesh: Any = None, prefill_chunk_size: int = PREFILL_CHUNK
                 ) -> list[GenerationResult]:
    """Generate for a list of prompts through one Engine (continuous batching; results in prompt
    order). Prompt i samples with seed + i. max_len: the cache (default: the longest prompt plus
    max_new_tokens, rounded up to a length bucket, within the model's limit). verify "tree":
    a draft tree of tree_budget nodes per cycle (default K-1) instead of the chain. mesh: an
    inference mesh with params placed on it (slots rounded up to a multiple of its data size)."""
    prompts = [list(map(int, p)) for p in prompts]
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    if slots < 1:
        raise GenerationError(f"slots must be >= 1, got {slots}")
    _check_prompts(cfg, prompts, max_new_tokens, max_len)
    if max_new_tokens == 0:
        k = int(cfg.block_size if block_size is None else block_size)
        return [GenerationResult([], _row_stats(mode, 0, 0, np.zeros(1), np.zeros(1), False,
                                                0.0, 0.0, k)) for _ in prompts]
    if max_len is None:
        need = max(len(p) for p in prompts) + max_new_tokens
        max_len = min(length_bucket(need), cfg.max_position_embeddings)
    slots = min(slots, len(prompts))
    if mesh is not None:
        slots = -(-slots // mesh.shape["data"]) * mesh.shape["data"]
    eng = Engine(params, cfg, slots=slots, max_len=max_len, mode=mode, block_size=block_size,
                 eos_token_ids=eos_token_ids, verify=verify, tree_budget=tree_budget, mesh=mesh,
                 chunk=prefill_chunk_size)
    index: dict[int, int] = {}
    reqs = []
    for i, p in enumerate(prompts):
        cb = None
        if on_tokens is not None:
            cb = (lambda i: lambda _r, ids: on_tokens(i, ids))(i)
        try:
            r = eng.submit(Request(p, max_new_tokens, temperature, top_p, top_k, seed + i,
                                   on_tokens=cb))
        except GenerationError as err:
            raise GenerationError(f"prompt {i}: {err}") from None
        index[r.id] = i
        reqs.append(r)
    while eng.has_work():
        eng.run_once()
    return [eng.result(r) for r in reqs]
