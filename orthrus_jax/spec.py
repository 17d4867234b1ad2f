"""Pure speculative-decoding functions: logit processing, greedy and rejection-sampling verification,
and the per-cycle commit of tokens (EOS and max_new_tokens cut-offs).

Shapes: B rows, K block size (anchor + K-1 drafts), V vocabulary. All functions are jit-friendly
with static shapes; sampling parameters may be traced scalars.

Alignment: block position i (0 = the anchor at absolute position a) predicts the token at a+i+1.
So draft d_{i+1} comes from diffusion logits at block position i, and is checked against the
AR distribution at block position i of the verification pass [anchor, d_1 .. d_{K-1}].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
RESIDUAL_FLOOR = 1e-5  # below this residual mass, the correction is drawn from p (as the reference)


TOP_P_CANDIDATES = 256  # top-p looks at this many best tokens first; a full sort only if short


def _top_p_threshold(x: Array, sorted_desc: Array, top_p: Array) -> Array:
    """Smallest logit kept by top-p, from the best logits sorted descending (a prefix of all).

    Probabilities use the normaliser over all of x, so a prefix of the sorted logits suffices
    whenever its mass reaches top_p. Keeps the smallest prefix whose mass reaches top_p: a token
    is kept iff the mass strictly before it is < top_p (HF's TopPLogitsWarper), at least one.
    """
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    probs = jnp.exp(sorted_desc - lse)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p).at[..., 0].set(True)
    return jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)


def process_logits(logits: Array, temperature: Array | float, top_p: Array | float = 1.0, *,
                   top_k: int = 0, use_top_p: bool = True) -> Array:
    """Normalised fp32 log-probabilities after temperature, then top-k, then top-p (HF order).

    temperature > 0 (traced). top_k is static (0 = off): lax.top_k, no full sort. top_p is traced;
    use_top_p=False (static) skips it. Removed tokens get -inf; ties at a threshold are kept (as
    HF). Without top-k, top-p first tries the TOP_P_CANDIDATES best tokens and falls back to a
    full sort (slow on CPU) only when their mass is below top_p. The result is exactly the
    distribution drafts are sampled from and that rejection sampling compares.
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    v = x.shape[-1]
    top_p = jnp.asarray(top_p, jnp.float32)
    if top_k > 0 and top_k < v:
        best = jax.lax.top_k(x, top_k)[0]
        # min, not best[..., -1:]: XLA:CPU keeps its fast top-k only for slices starting at 0
        x = jnp.where(x < jnp.min(best, axis=-1, keepdims=True), -jnp.inf, x)
        if use_top_p:
            x = jnp.where(x < _top_p_threshold(x, best, top_p), -jnp.inf, x)
    elif use_top_p:
        cap = min(v, TOP_P_CANDIDATES)
        best = jax.lax.top_k(x, cap)[0]
        enough = jnp.all(jnp.sum(jnp.exp(best - jax.nn.logsumexp(x, -1, keepdims=True)), -1)
                         >= top_p)
        thresh = jax.lax.cond(enough, lambda: _top_p_threshold(x, best, top_p),
                              lambda: _top_p_threshold(x, -jnp.sort(-x, axis=-1), top_p))
        x = jnp.where(x < thresh, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


NARROW_CANDIDATES = 64  # process_logits_rows tries this many best logits before its cap


def _top_k_rows(x: Array, kk: Array, p: Array, width: int) -> tuple[Array, Array, Array]:
    """Top-k per row (kk [B, 1...]: 0 = off) from x's `width` best logits: (x filtered, those
    best logits filtered, whether their mass reaches each row's top_p). Exact for rows with kk
    in 0..width."""
    v = x.shape[-1]
    best = jax.lax.top_k(x, width)[0]
    # the k-th best logit as a masked min (XLA:CPU keeps its fast top-k only for 0-based slices)
    kth = jnp.min(jnp.where(jnp.arange(width) < kk, best, jnp.inf), axis=-1, keepdims=True)
    kth = jnp.where((kk > 0) & (kk < v), kth, -jnp.inf)
    x = jnp.where(x < kth, -jnp.inf, x)
    best = jnp.where(best < kth, -jnp.inf, best)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    return x, best, jnp.sum(jnp.exp(best - lse), axis=-1, keepdims=True) >= p


def process_logits_rows(logits: Array, temperature: Array, top_p: Array, top_k: Array, *,
                        top_k_cap: int) -> Array:
    """process_logits with per-row settings: logits [B, ..., V], temperature/top_p/top_k [B].

    The same distribution as process_logits row by row (temperature, then top-k, then top-p; ties
    at a threshold kept), with every setting traced, so rows of one batch may differ without
    recompiling. top_k in 0..top_k_cap (0 = off; the static cap bounds the lax.top_k calls);
    temperature <= 0 is read as 1 (the caller picks greedy rows by argmax). top_p >= 1 = off.
    Candidates: the NARROW_CANDIDATES best logits when every row's top_k fits in them and their
    mass reaches its top_p (a narrow lax.top_k costs a third of a 256-wide one on CPU), else the
    cap's; a row whose top_p needs more than those takes the full-sort fallback.
    """
    lead = (logits.shape[0],) + (1,) * (logits.ndim - 1)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32).reshape(lead)
    x = logits.astype(jnp.float32) / t
    v = x.shape[-1]
    cap = min(v, max(int(top_k_cap), TOP_P_CANDIDATES))
    kk = jnp.clip(top_k, 0, cap).reshape(lead)
    p = jnp.asarray(top_p, jnp.float32).reshape(lead)
    use_p = p < 1.0
    narrow = min(NARROW_CANDIDATES, cap)
    x_n, best_n, enough_n = _top_k_rows(x, kk, p, narrow)
    if narrow < cap:
        def narrow_candidates():  # padded to the cap's width with -inf (no mass): same shapes
            pad = [(0, 0)] * (x.ndim - 1) + [(0, cap - narrow)]
            return x_n, jnp.pad(best_n, pad, constant_values=-jnp.inf), enough_n

        fits = jnp.all((kk <= narrow) & (enough_n | ~use_p))
        x, best, enough = jax.lax.cond(fits, narrow_candidates, lambda: _top_k_rows(x, kk, p, cap))
    else:
        x, best, enough = x_n, best_n, enough_n
    thresh = jax.lax.cond(jnp.all(enough | ~use_p),
                          lambda: _top_p_threshold(x, best, p),
                          lambda: _top_p_threshold(x, -jnp.sort(-x, axis=-1), p))
    x = jnp.where(use_p & (x < thresh), -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


SAMPLE_BLOCK = 128  # sample_tokens: vocabulary entries per block of the two-level search


def sample_tokens(key: Array, logprobs: Array) -> Array:
    """One token per leading index from log-probabilities [..., V] (normalised or not), by
    inverse CDF: the first token whose running probability sum exceeds u * total, u ~ U[0, 1).

    One uniform per draw, where jax.random.categorical draws Gumbel noise for every vocabulary
    entry (an unrecorded timing on a 2-core CPU, 16 rows x 31 drafts x 8,192 entries: 94 ms a
    cycle against 2.7 ms here). Exact to float32 resolution, like the Gumbel draw. See
    inverse_cdf for the search.
    """
    p = jnp.exp(logprobs.astype(jnp.float32))
    u = jax.random.uniform(key, logprobs.shape[:-1] + (1,), jnp.float32)
    return inverse_cdf(p, u)


def inverse_cdf(p: Array, u: Array) -> Array:
    """The token at fraction u [..., 1] in [0, 1) of the mass of p [..., V] (>= 0): the first
    entry whose running sum exceeds u * sum(p). Two levels: the SAMPLE_BLOCK-entry block whose
    running sum passes the threshold, then the entry inside it. Only entries (and blocks) of
    positive mass are ever chosen, also where float rounding puts the threshold past them: the
    last positive one is the fallback."""
    v = p.shape[-1]
    nb = -(-v // SAMPLE_BLOCK)
    p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, nb * SAMPLE_BLOCK - v)])
    pb = p.reshape(p.shape[:-1] + (nb, SAMPLE_BLOCK))
    block_sum = jnp.sum(pb, axis=-1)                                       # [..., nb]
    block_cum = jnp.cumsum(block_sum, axis=-1)
    threshold = u * block_cum[..., -1:]

    def first_passing(mass: Array, running: Array) -> Array:
        ok = (mass > 0) & (running > threshold)
        last = jnp.max(jnp.where(mass > 0, jnp.arange(mass.shape[-1]), 0), axis=-1)
        return jnp.where(jnp.any(ok, axis=-1), jnp.argmax(ok, axis=-1), last)

    b = first_passing(block_sum, block_cum)
    before = jnp.take_along_axis(block_cum - block_sum, b[..., None], axis=-1)
    inner = jnp.take_along_axis(pb, b[..., None, None], axis=-2)[..., 0, :]  # [..., BLOCK]
    j = first_passing(inner, before + jnp.cumsum(inner, axis=-1))
    return (b * SAMPLE_BLOCK + j).astype(jnp.int32)


def greedy_verify(drafts: Array, target_logits: Array) -> tuple[Array, Array]:
    """drafts [B, K-1], AR logits [B, K, V] -> (n_accepted [B], next token [B]).

    n_accepted = longest prefix with d_{i+1} == argmax p_i; next = argmax p at n_accepted (the
    correction on a mismatch, the bonus if all K-1 were accepted).
    """
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    match = (drafts == target[:, :-1]).astype(jnp.int32)
    n_acc = jnp.sum(jnp.cumprod(match, axis=-1), axis=-1).astype(jnp.int32)
    return n_acc, jnp.take_along_axis(target, n_acc[:, None], axis=1)[:, 0]


def rejection_verify(key: Array, drafts: Array, p_logprobs: Array,
                     q_logprobs: Array) -> tuple[Array, Array]:
    """Speculative (rejection) sampling with static shapes.

    drafts [B, K-1] sampled from q_logprobs [B, K-1, V] (the processed diffusion distribution);
    p_logprobs [B, K, V] the processed AR distribution. Accept d_i where u * q(d_i) < p(d_i)
    (i.e. with probability min(1, p/q)); n_acc = length of the accepted prefix. The next token is
    drawn from normalize(max(0, p - q)) at position n_acc, with q padded by a zero row at K-1 so
    that a full acceptance draws the bonus from p; a residual of mass < 1e-5 falls back to p.
    Returns (n_accepted [B], next token [B]).
    """
    k_u, k_next = jax.random.split(key)
    p = jnp.exp(p_logprobs)
    q = jnp.exp(q_logprobs)
    p_d = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, drafts.shape, jnp.float32)
    accepted = (u * q_d < p_d).astype(jnp.int32)
    n_acc = jnp.sum(jnp.cumprod(accepted, axis=-1), axis=-1).astype(jnp.int32)
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    p_n = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(q_pad, n_acc[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    dist = jnp.where(mass < RESIDUAL_FLOOR, p_n, residual / jnp.maximum(mass, 1e-30))
    return n_acc, sample_tokens(k_next, jnp.log(dist))


def commit_block(drafts: Array, n_acc: Array, next_token: Array, n_out: Array, max_new: Array,
                 eos_ids: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """The tokens one cycle emits: [d_1 .. d_{n_acc}, next], cut after the first EOS and at
    max_new - n_out.

    drafts [B, K-1] (K-1 may be 0: AR mode), n_acc/next_token/n_out/max_new [B].
    Returns (block [B, K] with the emitted tokens first, n_emit [B], finished [B]) where
    finished = an EOS was emitted or n_out + n_emit reached max_new.
    """
    b, km1 = drafts.shape
    idx = jnp.arange(km1 + 1, dtype=jnp.int32)[None, :]
    padded = jnp.concatenate([drafts, jnp.zeros((b, 1), drafts.dtype)], axis=1)
    block = jnp.where(idx < n_acc[:, None], padded, next_token[:, None]).astype(jnp.int32)
    n_valid = n_acc + 1
    is_eos = jnp.zeros(block.shape, bool)
    for e in eos_ids:
        is_eos = is_eos | (block == e)
    is_eos = is_eos & (idx < n_valid[:, None])
    first_eos = jnp.argmax(is_eos, axis=-1).astype(jnp.int32)
    has_eos = jnp.any(is_eos, axis=-1)
    n_emit = jnp.where(has_eos, first_eos + 1, n_valid)
    room = jnp.maximum(max_new - n_out, 0)
    eos_kept = has_eos & (first_eos < room)
    n_emit = jnp.minimum(n_emit, room)
    finished = eos_kept | (n_out + n_emit >= max_new)
    return block, n_emit.astype(jnp.int32), finished
