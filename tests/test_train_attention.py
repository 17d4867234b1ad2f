"""The training loss through orthrus_jax.attention (causal teacher without a prefix, chunked
diffusion attention that skips key chunks past each group's anchors) equals the dense path it
replaced: an AR pass over an empty cache and dense two-source attention."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import orthrus_jax.model as model_mod
import train.step as step_mod
from orthrus_jax.attention import attention
from orthrus_jax.cache import init_cache
from orthrus_jax.config import Qwen3Config
from orthrus_jax.params import init_params, split_params
from tests.test_attention import dense_reference
from train.anchors import sample_anchors

CFG = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, block_size=4, mask_token_id=1, eos_token_ids=(0,),
                  max_position_embeddings=256)


def _dense_attention(q, block_k, block_v, *, prefix_k=None, prefix_v=None, prefix_len=None,
                     causal, block_mask=None, layer=None, **_):
    if layer is not None:  # the model passes the whole cache and the layer index
        prefix_k, prefix_v = prefix_k[layer], prefix_v[layer]
    return dense_reference(q, prefix_k, prefix_v, prefix_len, block_k, block_v, causal, block_mask)


def _old_teacher(params, cfg, tokens, remat=False):
    """Today's teacher before this change: an AR pass over an empty cache of the row's length."""
    r, seq_len = tokens.shape
    hidden, cache = model_mod.ar_forward(params, cfg, tokens,
                                         init_cache(cfg, r, seq_len, params["embed"].dtype), remat,
                                         inference=False)
    return hidden, cache.k, cache.v


def _loss_and_grads(trainable, backbone, batch, opts):
    fn = lambda tr: step_mod.row_loss_terms(tr, backbone, CFG, batch, opts)["kl_sum"]  # noqa
    return jax.value_and_grad(fn)(trainable)


def test_loss_and_gradients_equal_dense_path(monkeypatch):
    params = init_params(CFG, jax.random.PRNGKey(0), jnp.float32, copy_diff=False)
    backbone, trainable = split_params(params)
    rng = np.random.default_rng(0)
    rows, seq_len, n_anchor = 2, 160, 24
    tokens = rng.integers(2, CFG.vocab_size, (rows, seq_len)).astype(np.int32)
    mask = (rng.random((rows, seq_len)) < 0.7).astype(np.uint8)
    anchors, valid = zip(*(sample_anchors(m, n_anchor, CFG.block_size, rng) for m in mask))
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
             "anchors": jnp.asarray(np.stack(anchors)), "anchor_valid": jnp.asarray(np.stack(valid))}
    # 2 anchor groups of 12 blocks; small attention chunks (32 queries x 32 keys) so that the
    # teacher runs 5 causal query chunks, and each group of 8 blocks skips prefix chunks
    opts = step_mod.LossOptions(block_size=CFG.block_size, remat=True, anchor_chunks=2)
    monkeypatch.setattr(model_mod, "attention",
                        functools.partial(attention, q_chunk=32, k_chunk=32, backend="xla"))
    loss, grads = jax.jit(lambda t: _loss_and_grads(t, backbone, batch, opts))(trainable)
    monkeypatch.setattr(model_mod, "attention", _dense_attention)
    monkeypatch.setattr(step_mod, "causal_forward", _old_teacher)
    ref_loss, ref_grads = jax.jit(lambda t: _loss_and_grads(t, backbone, batch, opts))(trainable)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree_util.tree_leaves(ref_grads)):
        scale = float(np.abs(np.asarray(r)).max())
        err = float(np.abs(np.asarray(g) - np.asarray(r)).max())
        assert err <= 1e-5 * scale, (jax.tree_util.keystr(path), err, scale)
