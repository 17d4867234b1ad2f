"""The training step: frozen AR pass -> teacher; one diffusion pass over all blocks -> KL loss.

Target alignment (the one place it is written, see `block_targets`): block position i
(0 = the clean anchor at absolute position a) predicts x_{a+i+1}; its teacher is the AR
distribution at absolute position a+i; the last block position (K-1) has no target.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from orthrus_jax.config import Qwen3Config
from orthrus_jax.model import causal_forward, diffusion_forward, lm_logits
from orthrus_jax.params import Params, merge_params

Array = jax.Array


def block_targets(tokens: Array, mask: Array, anchors: Array, anchor_valid: Array,
                  block_size: int) -> dict[str, Array]:
    """Per-block indices for one row set. tokens/mask [R, L], anchors/anchor_valid [R, B].

    Returns, each [R, B, K]:
      positions: absolute RoPE positions a + i of block position i;
      block_tokens: [x_a, MASK ...] is built by the caller from tokens at positions[..., 0];
      teacher_pos: a + i, the AR position whose distribution is block position i's teacher
        (clamped to the row, like target_pos, where the block runs past it);
      target_pos: a + i + 1, the token block position i predicts;
      valid: i <= K-2, the anchor slot is valid, and x_{a+i+1} is a response token.
    """
    r, seq_len = tokens.shape
    i = jnp.arange(block_size, dtype=jnp.int32)
    positions = anchors[..., None].astype(jnp.int32) + i                        # a + i
    # Past the row end (unsupervised) both are clamped into the row: an out-of-range gather
    # fills NaN, whose gradient is NaN even under a zero weight.
    teacher_pos = jnp.minimum(positions, seq_len - 1)                            # a + i
    target_pos = jnp.minimum(positions + 1, seq_len - 1)                         # a + i + 1
    in_row = positions + 1 <= seq_len - 1
    target_is_response = jnp.take_along_axis(mask, target_pos.reshape(r, -1), axis=1).reshape(target_pos.shape)
    valid = (i < block_size - 1) & anchor_valid[..., None] & in_row & target_is_response.astype(bool)
    return {"positions": positions, "teacher_pos": teacher_pos, "target_pos": target_pos,
            "valid": valid}


def teacher_stats(teacher_logits: Array) -> dict[str, Array]:
    """Per AR position: probabilities [.., V], negative entropy sum p log p, and the argmax."""
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(t_logp)
    return {"probs": probs, "neg_entropy": jnp.sum(probs * t_logp, axis=-1),
            "argmax": jnp.argmax(teacher_logits, axis=-1)}


def kl_and_agreement(probs: Array, neg_entropy: Array, t_argmax: Array,
                     student_logits: Array) -> tuple[Array, Array]:
    """Forward KL(p_teacher || p_student) = sum p log p - sum p log q, and top-1 agreement."""
    s = student_logits.astype(jnp.float32)
    cross = jax.nn.logsumexp(s, axis=-1) - jnp.sum(probs * s, axis=-1)   # -sum p log q
    return neg_entropy + cross, jnp.argmax(s, axis=-1) == t_argmax


@dataclasses.dataclass(frozen=True)
class LossOptions:
    block_size: int
    compute_dtype: Any = jnp.float32
    remat: bool = True
    anchor_chunks: int = 1          # diffusion pass + KL over groups of blocks (a checkpointed map)


def row_loss_terms(trainable: Params, backbone: Params, cfg: Qwen3Config, batch: dict[str, Array],
                   opts: LossOptions) -> dict[str, Array]:
    """Sums over one micro-batch: kl_sum, count, and per block position agree_sum/count [K-1].

    batch: tokens/mask [R, L], anchors/anchor_valid [R, B].
    """
    k = opts.block_size
    dt = opts.compute_dtype
    tokens, mask = batch["tokens"], batch["mask"]
    r, seq_len = tokens.shape
    anchors, anchor_valid = batch["anchors"], batch["anchor_valid"]
    nb = anchors.shape[1]

    # 1. Frozen AR pass (teacher + every layer's K/V), no gradient. Trainable masters are fp32,
    # the compute copy is in compute dtype (frozen weights already are).
    cast_train = jax.tree_util.tree_map(lambda x: x.astype(dt), trainable)
    frozen = jax.lax.stop_gradient(merge_params(backbone, jax.lax.stop_gradient(cast_train)))
    # A plain causal pass over the row (no cache: no scores against an empty prefix).
    hidden_ar, prefix_k, prefix_v = causal_forward(frozen, cfg, tokens, opts.remat)
    # Teacher distributions at every row position, once (gathered per block position below).
    teacher = jax.lax.stop_gradient(teacher_stats(lm_logits(frozen, hidden_ar)))
    prefix_k, prefix_v = jax.lax.stop_gradient(prefix_k), jax.lax.stop_gradient(prefix_v)

    tgt = block_targets(tokens, mask, anchors, anchor_valid, k)
    anchor_tok = jnp.take_along_axis(tokens, anchors, axis=1)                       # [R, B]
    block_tokens = jnp.concatenate(
        [anchor_tok[..., None], jnp.full((r, nb, k - 1), cfg.mask_token_id, tokens.dtype)], -1)

    # 2. Diffusion pass + KL, over groups of blocks so that the [blocks, K, V] logits exist for
    # one group at a time (checkpointed map). Anchors are sorted, so each group's attention
    # (orthrus_jax.attention) scores only the AR key chunks before its last anchor.
    g = opts.anchor_chunks
    assert nb % g == 0, f"anchors_per_row={nb} must divide by anchor_chunks={g}"

    def split(x):  # [R, B, ...] -> [G, R, B/G, ...]
        return jnp.moveaxis(x.reshape(r, g, nb // g, *x.shape[2:]), 1, 0)

    xs = (split(block_tokens), split(tgt["positions"]), split(tgt["teacher_pos"]),
          split(tgt["valid"]), split(anchors))

    # The trainable tree is closed over (a scan constant), not carried: a carry would be saved
    # once per group for the backward pass.
    params = merge_params(backbone, cast_train)

    def group(carry, x):
        btok, pos, tpos, valid, anc = x
        h = diffusion_forward(params, cfg, btok, pos, prefix_k, prefix_v, anc, opts.remat)
        s_logits = lm_logits(params, h)                                           # [R, b, K, V]
        flat = tpos.reshape(r, -1)
        probs = jnp.take_along_axis(teacher["probs"], flat[..., None], axis=1)
        negent = jnp.take_along_axis(teacher["neg_entropy"], flat, axis=1)
        t_arg = jnp.take_along_axis(teacher["argmax"], flat, axis=1)
        kl, agree = kl_and_agreement(probs.reshape(s_logits.shape), negent.reshape(tpos.shape),
                                     t_arg.reshape(tpos.shape), s_logits)
        vf = valid.astype(jnp.float32)
        out = {"kl_sum": jnp.sum(kl * vf), "count": jnp.sum(vf),
               "agree_sum": jnp.sum(agree * vf, axis=(0, 1))[: k - 1],
               "agree_count": jnp.sum(vf, axis=(0, 1))[: k - 1]}
        return carry, out

    if opts.remat:
        group = jax.checkpoint(group)
    _, outs = jax.lax.scan(group, None, xs)
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), outs)


def make_optimizer(b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.0,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW whose learning rate is a state hyperparameter, set every step
    by the caller (see cosine_lr), so the schedule can follow steps or wall-clock time."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=b1, b2=b2,
                                                             weight_decay=weight_decay))


def cosine_lr(peak: float, progress: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """LR at training progress in [0, 1]: linear warmup over warmup_frac, cosine to floor * peak."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_frac > 0 and progress < warmup_frac:
        return peak * progress / warmup_frac
    frac = (progress - warmup_frac) / max(1.0 - warmup_frac, 1e-9)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def set_lr(opt_state, lr):
    """Write the learning rate into the inject_hyperparams state of make_optimizer's chain."""
    clip_state, adam_state = opt_state
    hp = dict(adam_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
    return (clip_state, adam_state._replace(hyperparams=hp))


def make_train_step(cfg: Qwen3Config, opts: LossOptions, optimizer: optax.GradientTransformation):
    """step(trainable, opt_state, backbone, batch[accum, R, ...], lr) -> (trainable, opt_state, metrics).

    Gradients (and so optimizer state) exist for the trainable tree only. The loss is the token
    mean over all supervised positions of the whole global batch (the accumulated micro-batches).
    """

    def micro(trainable, backbone, mb):
        def loss_fn(tr):
            terms = row_loss_terms(tr, backbone, cfg, mb, opts)
            return terms["kl_sum"], terms
        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return grads, terms

    def step(trainable, opt_state, backbone, batch, lr):
        opt_state = set_lr(opt_state, lr)
        def acc(carry, mb):
            g_sum, t_sum = carry
            g, t = micro(trainable, backbone, mb)
            return (jax.tree_util.tree_map(jnp.add, g_sum, g),
                    jax.tree_util.tree_map(jnp.add, t_sum, t)), None

        zeros_g = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        k = opts.block_size
        zeros_t = {"kl_sum": jnp.zeros(()), "count": jnp.zeros(()),
                   "agree_sum": jnp.zeros((k - 1,)), "agree_count": jnp.zeros((k - 1,))}
        (g_sum, terms), _ = jax.lax.scan(acc, (zeros_g, zeros_t), batch)
        denom = jnp.maximum(terms["count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, g_sum)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        agree = terms["agree_sum"] / jnp.maximum(terms["agree_count"], 1.0)
        finite = jnp.isfinite(terms["kl_sum"]) & jnp.isfinite(optax.tree.norm(grads))
        finite &= jnp.isfinite(optax.tree.norm(trainable))
        metrics = {"loss": terms["kl_sum"] / denom, "agree": agree, "finite": finite,
                   "accept_len": jnp.sum(jnp.cumprod(agree)),
                   "targets": terms["count"], "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    return step
