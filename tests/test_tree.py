"""Draft trees (orthrus_jax.tree): best-first shape, ancestor masks, greedy walk, and exact
multi-draft rejection sampling (chi-square at depth 1 and 2; the power test against the biased
min(1, p/q)-per-sibling rule runs through the decoder in test_decoder_sampling)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthrus_jax import tree as T
from tests.test_decoder_sampling import P_MIN, chi2_pvalue

V, D = 8, 3
build = jax.jit(T.build_tree, static_argnums=(2,))
greedy_verify = jax.jit(T.greedy_tree_verify)


def _q(seed, scale=2.0, b=1, v=V, d=D):
    return jax.nn.log_softmax(scale * jax.random.normal(jax.random.PRNGKey(seed), (b, d, v)), -1)


def _paths(tree: T.Tree, row: int) -> dict[tuple[int, ...], int]:
    """Root-to-node token paths of one row's valid nodes -> node index."""
    tok, par, valid = (np.asarray(x[row]) for x in (tree.tokens, tree.parent, tree.valid))
    out = {}
    for i in range(1, tok.shape[0]):
        if valid[i]:
            path, j = [], i
            while j:
                path.append(int(tok[j]))
                j = par[j]
            out[tuple(reversed(path))] = i
    return out


@pytest.mark.parametrize("n", [1, 3, 7, 12])
def test_greedy_tree_is_the_best_first_top_n(n):
    """The greedy tree holds exactly the n root-to-node paths of highest draft probability
    (with at most MAX_CHILDREN children per node), by brute force over all paths."""
    q = _q(0, b=3)
    tree = build(jnp.array([5, 4, 3]), q, n)
    c = T.max_children(n)
    for row in range(3):
        qn = np.asarray(q[row], np.float64)
        ranked = [np.argsort(-qn[i])[:c] for i in range(D)]
        scored = [(sum(qn[i, t] for i, t in enumerate(p)), p)
                  for d in range(1, D + 1)
                  for p in itertools.product(*[ranked[i] for i in range(d)])]
        scored.sort(key=lambda x: -x[0])
        want = {tuple(int(t) for t in p) for _, p in scored[:n]}
        assert set(_paths(tree, row)) == want
        assert bool(jnp.all(tree.valid[row]))


def test_tree_arrays_are_consistent():
    q = _q(1, b=2)
    tree = build(jnp.array([5, 4]), q, 10, jax.random.PRNGKey(0))
    tok, dep, par, mask, kids = (np.asarray(x) for x in
                                 (tree.tokens, tree.depth, tree.parent, tree.mask, tree.children))
    for b in range(2):
        assert tok[b, 0] == [5, 4][b] and dep[b, 0] == 0
        for i in range(1, 11):
            assert dep[b, i] == dep[b, par[b, i]] + 1
            anc, j = {i}, i
            while j:
                j = par[b, i] if j == i else par[b, j]
                anc.add(j)
            assert set(np.flatnonzero(mask[b, i])) == anc
            assert i in kids[b, par[b, i]]
        for u in range(11):  # children: a prefix of ranks, distinct tokens (draws w/o replacement)
            ks = kids[b, u][kids[b, u] >= 0]
            assert (kids[b, u][: len(ks)] >= 0).all()
            assert len(set(tok[b, ks])) == len(ks)


def test_sparse_q_leaves_padding_nodes():
    """With q on 2 tokens per depth only 2 + 4 = 6 paths of depth <= 2 exist, fewer than the budget
    at D = 2... so the rest are invalid padding, never parents, never accepted."""
    q = jnp.full((1, 2, V), -jnp.inf).at[:, :, :2].set(jnp.log(jnp.array([0.7, 0.3])))
    for key in (None, jax.random.PRNGKey(0)):
        tree = build(jnp.array([3]), q, 9, key)
        assert int(tree.valid.sum()) == 1 + 6
        paths = _paths(tree, 0)
        assert all(t < 2 for p in paths for t in p)
        assert not bool(jnp.any(tree.children[~tree.valid] >= 0))


def test_greedy_walk_finds_the_longest_matching_path():
    """Random trees and random AR argmaxes: the walk's path, next token and K/V path agree with a
    brute-force longest match."""
    rng = np.random.default_rng(0)
    for seed in range(20):
        q = _q(seed, scale=1.0, b=2)
        tree = build(jnp.array([1, 2]), q, 9)
        # AR argmax at a node: the token of its most likely child half of the time
        t = tree.tokens.shape[1]
        target = rng.integers(0, V, (2, t))
        kids = np.asarray(tree.children)
        for b in range(2):
            for u in range(t):
                if kids[b, u, 0] >= 0 and rng.random() < 0.6:
                    target[b, u] = int(tree.tokens[b, kids[b, u, 0]])
        logits = jax.nn.one_hot(jnp.asarray(target), V) * 5.0
        n_acc, nxt, path = greedy_verify(tree, logits)
        assert path.shape == (2, D + 1)
        for b in range(2):
            paths = _paths(tree, b)
            best = ()
            for p in paths:
                node, ok = 0, True
                for i, tok in enumerate(p):
                    if target[b, node] != tok:
                        ok = False
                        break
                    node = paths[p[: i + 1]]
                if ok and len(p) > len(best):
                    best = p
            assert int(n_acc[b]) == len(best)
            end = paths[best] if best else 0
            assert int(nxt[b]) == target[b, end]
            assert [int(x) for x in tree.path_tokens(path)[b, : len(best)]] == list(best)
            assert int(path[b, len(best)]) == end


# ---------------------------------------------------------------------------------------------
# sampling: the emitted tokens follow p exactly

ROWS = 20000


def _node_p(tree: T.Tree, table: jax.Array) -> jax.Array:
    """A target p that depends on the path: log p at node = table[depth, token] [V]."""
    return jax.nn.log_softmax(table[tree.depth, tree.tokens], -1)


def _emitted(tree, n_acc, nxt, path):
    """First and second emitted tokens (second: -1 where the cycle emitted only one)."""
    toks = np.asarray(tree.path_tokens(path))
    n_acc, nxt = np.asarray(n_acc), np.asarray(nxt)
    first = np.where(n_acc >= 1, toks[:, 0], nxt)
    second = np.where(n_acc >= 2, toks[:, 1], np.where(n_acc == 1, nxt, -1))
    return first, second


def _run(verify, n_nodes, q_scale, sparse):
    table = 1.5 * jax.random.normal(jax.random.PRNGKey(5), (D + 1, V, V))
    q1 = _q(6, scale=q_scale)
    if sparse:  # a top-k style q: 3 tokens per depth
        keep = jax.lax.top_k(q1, 3)[0][..., -1:]
        q1 = jax.nn.log_softmax(jnp.where(q1 >= keep, q1, -jnp.inf), -1)
    q = jnp.broadcast_to(q1, (ROWS, D, V))
    k_tree, k_ver = jax.random.split(jax.random.PRNGKey(7))
    tree = jax.jit(lambda k, q: T.build_tree(jnp.full((ROWS,), 2), q, n_nodes, key=k))(k_tree, q)
    p = _node_p(tree, table)
    n_acc, nxt, path = jax.jit(verify)(k_ver, tree, p, q)
    first, second = _emitted(tree, n_acc, nxt, path)
    later_sibling = np.asarray(T._take_row(tree.rank, path[:, 1]))[np.asarray(n_acc) >= 1] > 0
    p_root = np.exp(np.asarray(p[0, 0], np.float64))
    pv1 = chi2_pvalue(np.bincount(first, minlength=V), p_root)
    # depth 2: given that the first token x was an accepted draft (a root-level event, independent
    # of x's subtree), the next token must follow p at x
    drafted = np.asarray(n_acc) >= 1
    x = np.bincount(first[drafted], minlength=V).argmax()
    sel = drafted & (first == x)
    p_x = np.exp(np.asarray(jax.nn.log_softmax(table[1, x]), np.float64))
    pv2 = chi2_pvalue(np.bincount(second[sel], minlength=V), p_x)
    return pv1, pv2, np.asarray(n_acc), sel.sum(), later_sibling.mean()


@pytest.mark.parametrize("n_nodes,q_scale,sparse", [(6, 2.0, False), (12, 1.0, True),
                                                    (1, 2.0, False)])
def test_rejection_tree_is_exact_at_depth_1_and_2(n_nodes, q_scale, sparse):
    pv1, pv2, n_acc, n_sel, later = _run(T.rejection_tree_verify, n_nodes, q_scale, sparse)
    assert pv1 > P_MIN and pv2 > P_MIN, (pv1, pv2)
    assert n_sel > 1000  # enough depth-2 samples
    # every branch exercised: a later sibling accepted after a rejection, all rejected, depth 2
    assert (later > 0.05 or n_nodes == 1) and (n_acc == 0).any()
    assert (n_acc >= min(n_nodes, 2)).mean() > 0.05
