"""Pure spec functions, and rejection sampling reproducing the exact AR distribution.

The chi-square tests use a tiny random model (vocab 16) whose AR marginals at positions 0..3 are
computed exactly by enumerating every prefix; thousands of rows of one prompt give the samples.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scistats

from infer import decoder
from infer.decoder import generate
from orthrus_jax import spec as S
from orthrus_jax import tree as T
from orthrus_jax.cache import init_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.model import ar_forward, lm_logits
from orthrus_jax.params import copy_ar_to_diff, init_params

V = 16
PROMPT = [2, 5, 9]
NEW = 4
ROWS = 2048
P_MIN = 1e-4  # deterministic seeds: this is a fixed check, not a flaky one


@pytest.fixture(scope="module")
def tiny():
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, block_size=4, mask_token_id=V - 1,
                      max_position_embeddings=64, eos_token_ids=())
    params = init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    # Moderately peaked distributions: top-k / top-p really cut q and p, and q overlaps p enough
    # that drafts are often accepted. (At a x60 scale q sat on ~2 tokens p barely covered, every
    # draft was rejected, and a q taken before top-k or before temperature went unnoticed; at
    # x4 both bugs, injected by hand, fail the cases below with p < 1e-50.)
    params["lm_head"] = params["lm_head"] * 4.0
    return cfg, params


@jax.jit(static_argnums=(1, 4, 5))
def _last_logprobs(params, cfg, toks, temperature, top_p, top_k):
    cache = init_cache(cfg, toks.shape[0], toks.shape[1] + 1)
    hidden, _ = ar_forward(params, cfg, toks, cache)
    return S.process_logits(lm_logits(params, hidden[:, -1]), temperature, top_p, top_k=top_k,
                            use_top_p=top_p < 1.0)


def exact_marginals(cfg, params, temperature, top_k, top_p):
    """P(token at new position t) for t < NEW, by enumerating all V^t prefixes."""
    margs, prefix_probs, prefixes = [], np.ones(1), [()]
    for t in range(NEW):
        toks = jnp.asarray([PROMPT + list(p) for p in prefixes], jnp.int32)
        logp = _last_logprobs(params, cfg, toks, temperature, top_p, top_k)
        cond = np.asarray(jnp.exp(logp), np.float64)  # [prefixes, V]
        joint = prefix_probs[:, None] * cond
        margs.append(joint.sum(0))
        prefix_probs = joint.reshape(-1)
        prefixes = [p + (v,) for p in prefixes for v in range(V)]
    return margs


def chi2_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    assert counts[expected == 0].sum() == 0, "sampled a token the processed p excludes"
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return scistats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


TREE = {"verify": "tree", "tree_budget": 6}  # K = 4: 6 nodes over depths 1..3, siblings


@pytest.mark.parametrize("mode,diff,temperature,top_k,top_p", [
    ("orthrus", "random", 1.0, 0, 1.0),
    ("orthrus", "copied", 1.0, 0, 1.0),
    ("orthrus", "random", 0.7, 6, 0.8),
    ("orthrus", "random", 1.3, 0, 0.9),
    ("orthrus", "random", 1.0, 0, 0.5),
    ("orthrus", "copied", 0.5, 0, 0.6),
    ("ar", "random", 0.7, 6, 0.8),
    ("tree", "random", 1.0, 0, 1.0),
    ("tree", "random", 0.7, 6, 0.8),
])
def test_sampling_matches_exact_ar_marginals(tiny, mode, diff, temperature, top_k, top_p):
    """Emitted tokens at new positions 0..3 follow the exact AR marginals (chain, tree, AR).
    Tree: K = 4 and 6 nodes, so positions 1..3 come from depths 1..3 of the first tree."""
    cfg, params = tiny
    if diff == "copied":
        params = copy_ar_to_diff(params)
    kw = TREE if mode == "tree" else {}
    res = generate(params, cfg, [PROMPT] * ROWS, mode="ar" if mode == "ar" else "orthrus",
                   max_new_tokens=NEW, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=11, batch_size=ROWS, **kw)
    toks = np.array([r.token_ids for r in res])
    assert toks.shape == (ROWS, NEW)
    margs = exact_marginals(cfg, params, temperature, top_k, top_p)
    for t in range(NEW):
        counts = np.bincount(toks[:, t], minlength=V)
        p = chi2_pvalue(counts, margs[t])
        assert p > P_MIN, f"position {t}: chi-square p={p:.2g}"
    if mode != "ar":  # both paths exercised: accepted drafts and rejections
        hist = np.sum([r.stats.acceptance_hist for r in res], axis=0)
        assert hist[0] > 0 and hist[1:].sum() > 0
        if mode == "tree":
            assert hist[2:].sum() > 0


def _min_pvalue(cfg, params, temperature, top_k, top_p, **kw) -> float:
    res = generate(params, cfg, [PROMPT] * ROWS, mode="orthrus", max_new_tokens=NEW,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=11, batch_size=ROWS,
                   **kw)
    toks = np.array([r.token_ids for r in res])
    margs = exact_marginals(cfg, params, temperature, top_k, top_p)
    return min(chi2_pvalue(np.bincount(toks[:, t], minlength=V), margs[t]) for t in range(NEW))


@pytest.mark.parametrize("bug", ["q before top-k/top-p", "q before temperature"])
def test_chi2_catches_a_wrong_q(tiny, monkeypatch, bug):
    """Power: drafts sampled from the processed q but judged by a q taken before top-k/top-p, or
    before temperature (bugs seen in other implementations) fail the chi-square test."""
    cfg, params = tiny
    real_processed, real_verify = decoder._processed, S.rejection_verify
    raw = {}

    def processed(spec, sampling, logits):
        if logits.shape[-2] == spec.block_size - 1:  # the draft (q) logits
            scale = sampling.temperature if bug == "q before top-k/top-p" else 1.0
            raw["q"] = jax.nn.log_softmax(logits / scale, axis=-1)
        return real_processed(spec, sampling, logits)

    monkeypatch.setattr(decoder, "_processed", processed)
    monkeypatch.setattr(S, "rejection_verify", lambda key, d, p, q: real_verify(key, d, p, raw["q"]))
    jax.clear_caches()  # the decoder's jitted functions must be traced with the bug
    try:
        assert _min_pvalue(cfg, params, 0.7, 6, 0.8) < P_MIN  # measured: 4e-55 and 1e-89
    finally:
        monkeypatch.undo()
        jax.clear_caches()  # and never reused by later tests


def biased_tree_verify(key, tree: T.Tree, p_logprobs, q_logprobs):
    """The biased rule (hipfire #483): each sibling accepted with min(1, p/q) against the
    unchanged p and q marginals, the correction from normalize(max(p - q, 0)). Not exact."""
    b = p_logprobs.shape[0]
    p, q = jnp.exp(p_logprobs), jnp.exp(q_logprobs)
    rows = jnp.arange(b)
    cur, stopped, nxt = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32)
    walked = []
    for s in range(tree.walk + 1):
        key, k_u, k_s = jax.random.split(key, 3)
        ps = T._take_row(p, cur)
        qs = q[:, min(s, q.shape[1] - 1)]
        kids = T._take_row(tree.children, cur)
        found = jnp.full((b,), -1, jnp.int32)
        u = jax.random.uniform(k_u, kids.shape)
        for j in range(kids.shape[1]):
            x = jnp.take_along_axis(tree.tokens, jnp.maximum(kids[:, j], 0)[:, None], 1)[:, 0]
            acc = (kids[:, j] >= 0) & (found < 0) & (u[:, j] * qs[rows, x] < ps[rows, x])
            found = jnp.where(acc, kids[:, j], found)
        res = jnp.maximum(ps - qs, 0.0)
        mass = res.sum(-1, keepdims=True)
        dist = jnp.where(mass < S.RESIDUAL_FLOOR, ps, res / jnp.maximum(mass, 1e-30))
        stop = ~stopped & (found < 0)
        nxt = jnp.where(stop, S.sample_tokens(k_s, jnp.log(dist)), nxt)
        cur = jnp.where(stopped | stop, cur, found)
        stopped = stopped | stop
        walked.append(cur)
    return T._take_row(tree.depth, cur), nxt, T._full_path(tree, jnp.stack(walked[:-1]))


def test_chi2_catches_min_p_over_q_per_sibling(tiny, monkeypatch):
    """Power: tree verification with min(1, p/q) per sibling against the q marginals (instead of
    the recursive residual rule) fails the decoder's chi-square test."""
    cfg, params = tiny
    monkeypatch.setattr(T, "rejection_tree_verify", biased_tree_verify)
    jax.clear_caches()
    try:
        assert _min_pvalue(cfg, params, 0.7, 6, 0.8, **TREE) < P_MIN  # measured: 8e-31
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_seed_reproducible(tiny):
    cfg, params = tiny
    kw = dict(max_new_tokens=NEW, temperature=1.0, batch_size=4)
    a = generate(params, cfg, [PROMPT] * 4, seed=1, **kw)
    b = generate(params, cfg, [PROMPT] * 4, seed=1, **kw)
    c = generate(params, cfg, [PROMPT] * 4, seed=2, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def _hf_process(logits, temperature, top_k, top_p):
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    x = torch.tensor(np.asarray(logits))
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.log_softmax(x, -1).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 20, 0.8), (1.0, 0, 0.8), (0.5, 5, 1.0), (1.0, 0, 1.0), (2.0, 0, 0.95)])
def test_process_logits_matches_hf_warpers(temperature, top_k, top_p):
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 1000))
    ours = np.asarray(S.process_logits(logits, temperature, top_p, top_k=top_k,
                                       use_top_p=top_p < 1.0))
    ref = _hf_process(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(np.where(np.isinf(ref), 0, ours), np.where(np.isinf(ref), 0, ref),
                               atol=1e-5)


def test_process_logits_top_p_full_sort_fallback():
    """A flat distribution needs more than TOP_P_CANDIDATES tokens for top_p: the sort path."""
    logits = 0.01 * jax.random.normal(jax.random.PRNGKey(3), (2, 1000))
    ours = np.asarray(S.process_logits(logits, 1.0, 0.9))
    ref = _hf_process(logits, 1.0, 0, 0.9)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    assert (~np.isinf(ours)).sum(-1).min() > S.TOP_P_CANDIDATES


@pytest.mark.parametrize("v", [16, 300, 8192])
def test_sample_tokens_draws_the_distribution(v):
    """sample_tokens' two-level inverse CDF against the distribution itself (chi-square over
    200,000 draws, leading axes batched): masses in the first block, a middle one and the last,
    partial one (v = 300: 128-entry blocks), tokens of probability 0 never drawn."""
    rng = np.random.default_rng(v)
    probs = np.zeros(v)
    support = np.unique(np.concatenate([[0, v // 2, v - 1], rng.integers(0, v, 7)]))
    probs[support] = rng.dirichlet(np.ones(len(support)))
    logprobs = jnp.log(jnp.asarray(probs, jnp.float32))
    batched = S.sample_tokens(jax.random.PRNGKey(3), jnp.broadcast_to(logprobs, (4, 5, v)))
    assert batched.shape == (4, 5) and batched.dtype == jnp.int32
    keys = jax.random.split(jax.random.PRNGKey(3), 200000)
    draws = jax.jit(jax.vmap(S.sample_tokens, (0, None)))(keys, logprobs)
    counts = np.bincount(np.asarray(draws), minlength=v)
    assert chi2_pvalue(counts, probs) > P_MIN


def _inverse_cdf_reference(p: np.ndarray, u: float) -> int:
    """First positive entry whose float64 running sum exceeds u * total."""
    cum = np.cumsum(p.astype(np.float64))
    hits = np.nonzero((p > 0) & (cum > u * cum[-1]))[0]
    return int(hits[0]) if len(hits) else int(np.nonzero(p > 0)[0][-1])


def test_inverse_cdf_boundaries():
    """Fixed thresholds: the first and last positive entries at u = 0 and u just below 1, empty
    blocks skipped, rows searched with their own u, and a float-rounding case (found in review)
    where the threshold falls between a block's true start and its float start: the entry drawn
    must still have positive mass (a zero-mass entry 128 used to come back)."""
    p = np.zeros(256, np.float32)
    p[0], p[129] = 0.41988477, 0.45361233
    assert int(S.inverse_cdf(jnp.asarray(p), jnp.asarray([0.48069394]))) == 129
    q = np.zeros(700, np.float32)
    q[[3, 130, 131, 650]] = [0.1, 0.2, 0.3, 0.4]          # blocks 0, 1 and 5; 2-4 empty
    us = np.array([0.0, 0.05, 0.1, 0.29, 0.3, 0.6, 0.61, np.nextafter(np.float32(1), 0)],
                  np.float32)
    got = np.asarray(S.inverse_cdf(jnp.broadcast_to(jnp.asarray(q), (len(us), 700)),
                                   jnp.asarray(us)[:, None]))
    assert got.tolist() == [_inverse_cdf_reference(q, float(u)) for u in us]
    assert got[0] == 3 and got[-1] == 650


def test_inverse_cdf_matches_float64_reference_and_never_draws_zero_mass():
    """Random sparse distributions and thresholds: every draw has positive mass, and any
    disagreement with the float64 search sits within float32 rounding of an entry boundary."""
    rng = np.random.default_rng(0)
    n, v = 4000, 1000
    p = rng.random((n, v)).astype(np.float32) * (rng.random((n, v)) < 0.02)
    p[:, 0] += (p.sum(1) == 0)                                 # no empty row
    u = rng.random((n, 1)).astype(np.float32)
    got = np.asarray(S.inverse_cdf(jnp.asarray(p), jnp.asarray(u)))
    assert np.all(p[np.arange(n), got] > 0)
    for i in np.nonzero(got != [_inverse_cdf_reference(p[i], float(u[i, 0])) for i in range(n)])[0]:
        cum = np.cumsum(p[i].astype(np.float64))
        assert np.min(np.abs(cum - u[i, 0] * cum[-1])) < 1e-5 * cum[-1]


def test_sample_tokens_catches_a_sharpened_distribution():
    """The same check has the power to see a mild bias: draws from p^1.1 (renormalised) fail it."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sharp = probs ** 1.1 / np.sum(probs ** 1.1)
    keys = jax.random.split(jax.random.PRNGKey(4), 200000)
    draws = jax.jit(jax.vmap(S.sample_tokens, (0, None)))(keys, jnp.log(jnp.asarray(sharp)))
    assert chi2_pvalue(np.bincount(np.asarray(draws), minlength=4), probs) < P_MIN


def test_greedy_verify():
    target_tokens = np.array([[3, 4, 5, 6], [3, 9, 5, 6], [7, 7, 7, 7]])
    logits = jax.nn.one_hot(target_tokens, 10)
    drafts = jnp.array([[3, 4, 5], [3, 4, 5], [1, 7, 7]])
    n_acc, nxt = S.greedy_verify(drafts, logits)
    assert n_acc.tolist() == [3, 1, 0]  # all accepted (bonus 6); mismatch at 2; at 1
    assert nxt.tolist() == [6, 9, 7]


def test_rejection_verify_all_accepted_when_q_equals_p():
    logp = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8)))
    drafts = jnp.array([[1, 2, 3]])
    n_acc, _ = S.rejection_verify(jax.random.PRNGKey(1), drafts, logp, logp[:, :3])
    assert n_acc.tolist() == [3]  # p/q = 1 everywhere: always accepted, bonus from p


def test_commit_block_eos_and_max_new():
    drafts = jnp.array([[4, 0, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7], [0, 5, 6, 7]])
    n_acc = jnp.array([4, 4, 1, 0])
    nxt = jnp.array([9, 9, 9, 9])
    n_out = jnp.array([0, 10, 0, 0])
    max_new = jnp.array([100, 13, 100, 100])
    block, n_emit, fin = S.commit_block(drafts, n_acc, nxt, n_out, max_new, (0,))
    # row 0: EOS is the 2nd accepted draft -> emit [4, 0] and stop
    # row 1: 5 valid tokens but only 3 left before max_new -> [4, 5, 6], finished
    # row 2: one accepted draft + correction -> [4, 9], continue
    # row 3: EOS drafted but rejected (n_acc 0) -> only the correction 9, continue
    assert n_emit.tolist() == [2, 3, 2, 1]
    assert fin.tolist() == [True, True, False, False]
    assert block[0, :2].tolist() == [4, 0] and block[1, :5].tolist() == [4, 5, 6, 7, 9]
    assert block[2, :2].tolist() == [4, 9] and block[3, :1].tolist() == [9]
    # the correction itself is EOS
    _, n_emit, fin = S.commit_block(drafts[2:3], jnp.array([1]), jnp.array([0]), jnp.array([0]),
                                    jnp.array([100]), (0,))
    assert n_emit.tolist() == [2] and fin.tolist() == [True]
    # AR mode: no drafts
    block, n_emit, fin = S.commit_block(jnp.zeros((1, 0), jnp.int32), jnp.array([0]),
                                        jnp.array([5]), jnp.array([2]), jnp.array([3]), (0,))
    assert block.tolist() == [[5]] and n_emit.tolist() == [1] and fin.tolist() == [True]
