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


def process_logits(logits: Array, temperature: Array | float, top_k: Array | int = 0,
                   top_p: Array | float = 1.0, *, filtered: bool = True) -> Array:
    """Normalised fp32 log-probabilities after temperature, then top-k, then top-p (HF order).

    temperature > 0. top_k <= 0 disables top-k; top_p >= 1 disables top-p. Ties at the top-k
    threshold are kept (as HF). top-p keeps the smallest prefix of the sorted distribution whose
    mass reaches top_p (always at least one token). filtered=False (static) skips the sort when
    neither filter is in use. Removed tokens get -inf.
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if filtered:
        v = x.shape[-1]
        sorted_desc = -jnp.sort(-x, axis=-1)
        k = jnp.asarray(top_k, jnp.int32)
        kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, v - 1)[..., None]
                                  * jnp.ones(x.shape[:-1] + (1,), jnp.int32), axis=-1)
        x = jnp.where((k > 0) & (x < kth), -jnp.inf, x)
        sorted_desc = jnp.where((k > 0) & (sorted_desc < kth), -jnp.inf, sorted_desc)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < jnp.asarray(top_p, jnp.float32)
        keep_sorted = keep_sorted.at[..., 0].set(True)
        # threshold = smallest kept sorted logit; keep every token at or above it
        thresh = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < thresh, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def sample_tokens(key: Array, logprobs: Array) -> Array:
    """One token per leading index from normalised log-probabilities [..., V]."""
    return jax.random.categorical(key, logprobs, axis=-1).astype(jnp.int32)


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
