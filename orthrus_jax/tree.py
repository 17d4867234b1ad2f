"""Draft trees from the diffusion view's per-position distributions, and their verification.

The diffusion pass gives one distribution q_d per draft depth d = 1..D (D = K-1); it does not
condition on the path, so every node at depth d shares q_d. A tree of at most N nodes besides
the root (the anchor) is built with static shapes in two steps:

1. Shape, a function of q alone: best-first over rank paths. A node is a path of sibling ranks
   (r_1, ..., r_d); its score is a sum of per-step log values. Greedy: log q_i at rank r_i of q_i
   sorted descending, i.e. the product of draft probabilities. Sampling: a rank-0 draw (the
   chain's) is accepted far more often than its probability (it is drawn from q, and q is close
   to p), and a later draw is tried only after the earlier ones were rejected: a step is valued
   log a + r_i log(1 - a) + log(q_i[r_i] / q_i[0]), with a the acceptance of a draw (the
   decoder passes an estimate from the row's earlier cycles; default FIRST_ACCEPT). The N
   best-scoring paths are kept (ties: shallower, then lower rank first), which is closed under
   taking parents; a per-depth beam of N over at most C children per node finds them exactly.
   Each node's children are ranks 0..m-1 (a prefix).
2. Tokens. Greedy: a rank-r child holds the r-th most likely token of its depth. Sampling: node
   u's children are m draws without replacement from q_{depth(u)+1} (Gumbel-top-m, noise of its
   own per node), in draw order. Since the shape depends only on q, each node's children are
   fresh draws given its path, as the exact acceptance rule requires.

Verification walks from the root. Greedy: go to the child whose token is the AR argmax at the
current node, while one exists. Sampling: recursive rejection over the siblings in draw order
(SpecInfer's multi-draft rule with the residual update, for draws without replacement as in
Recursive Speculative Decoding, arXiv 2402.14160): with residual r = p (the AR distribution at
the node) and the proposal q_j (q with earlier siblings removed, renormalised), accept sibling x_j
with probability min(1, r(x_j) / q_j(x_j)); on a rejection set r = normalize(max(r - q_j, 0)).
Each step is an exact speculative-sampling step, so the emitted token is distributed as p. If
every sibling is rejected the next token is drawn from r (the bonus, from p, at a leaf). Never
min(1, p / q) against top-k marginals: that is biased.

Node 0 is the anchor at position length; node i sits at position length + depth[i] and attends
to the cache and to its ancestors and itself (mask). The accepted path's nodes are listed by
depth in `path`, so their K/V can be moved to consecutive cache positions.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from orthrus_jax.spec import RESIDUAL_FLOOR, sample_tokens

Array = jax.Array
MAX_CHILDREN = 8  # children per node, at most (the per-depth beam is N x C candidates)
FIRST_ACCEPT = 0.7  # sampling shape: default acceptance of a node's first draw


@flax.struct.dataclass
class Tree:
    """A batch of draft trees with T = N + 1 nodes each (node 0 = the anchor)."""

    tokens: Array    # int32[B, T]
    depth: Array     # int32[B, T]: 0 for the anchor; position = length + depth
    parent: Array    # int32[B, T]: the anchor is its own parent
    rank: Array      # int32[B, T]: order among siblings (draw order, or likelihood rank)
    valid: Array     # bool[B, T]: slots a sparse q cannot fill are padding, never accepted
    children: Array  # int32[B, T, C]: child node by rank, -1 where none
    mask: Array      # bool[B, T, T]: mask[b, i, j] = node j is node i or one of its ancestors
    max_depth: int = flax.struct.field(pytree_node=False, default=0)  # D = K - 1 (static)

    @property
    def walk(self) -> int:
        """Static bound on a path's length: min(N, D)."""
        return min(self.tokens.shape[1] - 1, self.max_depth)

    def path_tokens(self, path: Array) -> Array:
        """The tokens at path [B, D+1] nodes 1..D: the accepted drafts, as a chain [B, D]."""
        return jnp.take_along_axis(self.tokens, path[:, 1:], axis=1)


def max_children(n_nodes: int) -> int:
    return max(1, min(n_nodes, MAX_CHILDREN))


def _shape(sorted_lp: Array, n: int) -> tuple[Array, Array, Array, Array]:
    """One row: sorted_lp [D, C] (log q_d at ranks 0..C-1, descending) -> depth, parent, rank,
    valid for nodes 1..n (parent indices refer to 0..n, 0 = the root)."""
    d_max, c = sorted_lp.shape
    lp = jnp.where(jnp.isnan(sorted_lp), -jnp.inf, sorted_lp)

    def depth_step(beam, lp_d):
        cand = (beam[:, None] + lp_d[None, :]).reshape(-1)  # [N*C]: parent beam slot x rank
        score, idx = jax.lax.top_k(cand, n)  # ties: lower index first
        return score, (score, (idx // c).astype(jnp.int32), (idx % c).astype(jnp.int32))

    beam0 = jnp.full((n,), -jnp.inf, jnp.float32).at[0].set(0.0)
    _, (scores, parent_slot, ranks) = jax.lax.scan(depth_step, beam0, lp)  # [D, N] each
    # the n best over all depths; flat order is depth-major, so ties pick the shallower node
    top, sel = jax.lax.top_k(scores.reshape(-1), n)
    depth = (sel // n + 1).astype(jnp.int32)
    slot = (sel % n).astype(jnp.int32)
    node_of = jnp.full((d_max, n), -1, jnp.int32).at[depth - 1, slot].set(
        jnp.arange(1, n + 1, dtype=jnp.int32))
    pslot = parent_slot[depth - 1, slot]
    parent = jnp.where(depth == 1, 0, node_of[jnp.maximum(depth - 2, 0), pslot])
    valid = jnp.isfinite(top) & (parent >= 0)
    return depth, jnp.maximum(parent, 0), ranks[depth - 1, slot], valid


def _ancestors(parent: Array, valid: Array, d_max: int) -> tuple[Array, Array]:
    """parent/valid [B, T] -> (mask [B, T, T] ancestor-or-self, valid with invalid ancestors)."""
    t = parent.shape[1]
    ids = jnp.arange(t, dtype=jnp.int32)
    a = jnp.broadcast_to(ids, parent.shape)
    mask = a[:, :, None] == ids[None, None, :]
    for _ in range(d_max):
        a = jnp.take_along_axis(parent, a, axis=1)
        mask = mask | (a[:, :, None] == ids[None, None, :])
    valid = jnp.all(jnp.where(mask, valid[:, None, :], True), axis=-1)
    return mask, valid


def build_tree(anchor: Array, q_logprobs: Array, n_nodes: int, key: Array | None = None,
               first_accept: Array | float = FIRST_ACCEPT) -> Tree:
    """A draft tree of n_nodes nodes besides the anchor from q_logprobs [B, D, V] (log q_d for
    depths 1..D). key None: greedy (rank-r child = r-th most likely token); else children are
    drawn without replacement from q (sampling), and the shape values a first draw at
    first_accept (scalar or [B], in (0, 1); it must not depend on this cycle's draws). Static
    shapes throughout."""
    b, d_max, v = q_logprobs.shape
    n = int(n_nodes)
    c = min(max_children(n), v)
    sorted_lp, top_ids = jax.lax.top_k(q_logprobs.astype(jnp.float32), c)  # [B, D, C]
    value = sorted_lp
    if key is not None:
        a = jnp.broadcast_to(jnp.asarray(first_accept, jnp.float32), (b,))
        ranks = jnp.arange(c, dtype=jnp.float32)
        # the max, not sorted_lp[..., :1] (the same value): slicing top_k's output made XLA on
        # the CPU run a full sort of the vocabulary (measured 830 ms instead of 13 ms at
        # 8 x 31 x 8192)
        top = jnp.max(q_logprobs.astype(jnp.float32), axis=-1, keepdims=True)
        value = (sorted_lp - top + jnp.log(a)[:, None, None]
                 + ranks * jnp.log1p(-a)[:, None, None])
    depth, parent, rank, valid = jax.vmap(lambda s: _shape(s, n))(value)
    zero = jnp.zeros((b, 1), jnp.int32)
    depth = jnp.concatenate([zero, depth], 1)
    parent = jnp.concatenate([zero, parent], 1)
    rank = jnp.concatenate([zero, rank], 1)
    valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], 1)
    mask, valid = _ancestors(parent, valid, min(n, d_max))
    rows = jnp.arange(b)[:, None]
    if key is None:
        tok = top_ids[rows, jnp.maximum(depth - 1, 0), rank]
    else:
        # node u's children: draws without replacement from q at depth(u) + 1 (Gumbel-top-c)
        child_q = jnp.take_along_axis(
            q_logprobs, jnp.minimum(depth, d_max - 1)[:, :, None], axis=1)  # [B, T, V]
        g = jax.random.gumbel(key, child_q.shape, jnp.float32)
        drawn = jax.lax.top_k(child_q + g, c)[1]  # [B, T, C]
        tok = drawn[rows, parent, rank]
    tokens = jnp.where(depth == 0, anchor[:, None], tok).astype(jnp.int32)
    t = n + 1
    target = jnp.where(valid & (depth > 0), parent * c + rank, t * c)  # padding: dropped
    children = jnp.full((b, t * c), -1, jnp.int32).at[rows, target].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
    return Tree(tokens=tokens, depth=depth, parent=parent, rank=rank, valid=valid,
                children=children.reshape(b, t, c), mask=mask, max_depth=d_max)


def _take_row(x: Array, idx: Array) -> Array:
    """x [B, T, ...], idx [B] -> x[b, idx[b]]."""
    return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _full_path(tree: Tree, walked: Array) -> Array:
    """Nodes visited [steps, B] -> path [B, D+1]: the root, then the node at each depth (entries
    past the accepted depth repeat the last node or are 0; callers cut at n_accepted)."""
    b = walked.shape[1]
    pad = tree.max_depth - walked.shape[0]
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), walked.T,
                            jnp.zeros((b, pad), jnp.int32)], 1)


def greedy_tree_verify(tree: Tree, target_logits: Array) -> tuple[Array, Array, Array]:
    """AR logits [B, T, V] at every node -> (n_accepted [B], next token [B], path [B, D+1]).

    Walks from the root to the child whose token is the AR argmax at the current node (siblings
    hold distinct tokens); path[:, d] = the accepted node at depth d (d <= n_accepted).
    """
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, T]
    b = target.shape[0]

    def step(cur, _):
        kids = _take_row(tree.children, cur)  # [B, C]
        kid_tok = jnp.take_along_axis(tree.tokens, jnp.maximum(kids, 0), axis=1)
        hit = (kids >= 0) & (kid_tok == _take_row(target, cur)[:, None])
        nxt = jnp.where(jnp.any(hit, -1), jnp.max(jnp.where(hit, kids, -1), -1), cur)
        return nxt, nxt

    cur, walked = jax.lax.scan(step, jnp.zeros((b,), jnp.int32), None, length=tree.walk)
    return _take_row(tree.depth, cur), _take_row(target, cur), _full_path(tree, walked)


def rejection_tree_verify(key: Array, tree: Tree, p_logprobs: Array,
                          q_logprobs: Array) -> tuple[Array, Array, Array]:
    """Exact multi-draft rejection sampling down a sampled tree.

    p_logprobs [B, T, V]: the processed AR distribution at every node; q_logprobs [B, D, V]: the
    processed draft distributions the children were drawn from (build_tree with a key). Returns
    (n_accepted [B], next token [B], path [B, D+1]) as greedy_tree_verify.
    """
    b, t, v = p_logprobs.shape
    c = tree.children.shape[2]
    steps = tree.walk  # the last step is at a leaf: its next token is the bonus, from p
    q = jnp.exp(q_logprobs.astype(jnp.float32))
    k_u, k_s = jax.random.split(key)
    u = jax.random.uniform(k_u, (steps + 1, c, b), jnp.float32)
    rows = jnp.arange(b)

    def node_outcome(cur, s, active):
        """Recursive rejection over cur's children -> (accepted child or -1, residual). Stops
        when no active row has a sibling left to judge (most cycles end after a few)."""
        r = jnp.exp(_take_row(p_logprobs, cur).astype(jnp.float32))  # [B, V]
        qd = q[:, jnp.minimum(s, q.shape[1] - 1)]  # children of a depth-s node are at s + 1
        kids = _take_row(tree.children, cur)  # [B, C]

        def live_at(j, found):
            kid = kids[:, jnp.minimum(j, c - 1)]
            return (j < c) & (kid >= 0) & (found < 0) & active

        def sibling(carry):
            j, r, qd, found = carry
            kid = kids[:, j]
            x = jnp.take_along_axis(tree.tokens, jnp.maximum(kid, 0)[:, None], axis=1)[:, 0]
            live = live_at(j, found)
            qx, rx = qd[rows, x], r[rows, x]
            acc = live & (u[s, j] * qx < rx)
            found = jnp.where(acc, kid, found)
            rej = live & ~acc
            res = jnp.maximum(r - qd, 0.0)
            mass = jnp.sum(res, -1, keepdims=True)
            r = jnp.where(rej[:, None] & (mass >= RESIDUAL_FLOOR),
                          res / jnp.maximum(mass, 1e-30), r)
            q_rest = qd.at[rows, x].set(0.0)
            q_rest = q_rest / jnp.maximum(jnp.sum(q_rest, -1, keepdims=True), 1e-30)
            qd = jnp.where(rej[:, None], q_rest, qd)
            return j + 1, r, qd, found

        _, r, _, found = jax.lax.while_loop(
            lambda cr: jnp.any(live_at(cr[0], cr[3])), sibling,
            (jnp.int32(0), r, qd, jnp.full((b,), -1, jnp.int32)))
        return found, r

    def step(carry):
        s, cur, stopped, nxt, path = carry
        found, r = node_outcome(cur, s, ~stopped)
        draw = sample_tokens(jax.random.fold_in(k_s, s), jnp.log(r))
        stop_here = ~stopped & (found < 0)
        nxt = jnp.where(stop_here, draw, nxt)
        cur = jnp.where(stopped | stop_here, cur, found)
        path = path.at[jnp.minimum(s, steps - 1)].set(jnp.where(s < steps, cur, path[steps - 1]))
        return s + 1, cur, stopped | stop_here, nxt, path

    init = (jnp.int32(0), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool),
            jnp.zeros((b,), jnp.int32), jnp.zeros((steps, b), jnp.int32))
    _, cur, _, nxt, path = jax.lax.while_loop(
        lambda cr: (cr[0] <= steps) & jnp.any(~cr[2]), step, init)
    return _take_row(tree.depth, cur), nxt, _full_path(tree, path)
