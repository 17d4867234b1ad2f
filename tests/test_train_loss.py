"""The training loss end to end: against a torch KL over HF's AR logits and the torch diffusion
oracle (tests/hf_fixtures.py), and unchanged (loss and gradients) by anchor_chunks and remat."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orthrus_jax.hf import read_hf_params
from orthrus_jax.params import split_params
from tests.hf_fixtures import (
    TINY_SPECS, diffusion_oracle, hf_logits, make_hf_model, random_diff_weights, save_hf_model,
)
from train.step import LossOptions, row_loss_terms

K = 6
SEQ = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model, its random _diff tensors, our cfg and params, a batch of 2 rows x 4 anchors)."""
    spec = TINY_SPECS[1]                     # untied, GQA 2, head_dim != hidden / heads
    model = make_hf_model(spec, seed=3)
    diff = random_diff_weights(model, seed=5)
    out = save_hf_model(model, str(tmp_path_factory.mktemp("loss")), diff=diff,
                        config_updates={"mask_token_id": spec.vocab - 1, "block_size": K})
    cfg, params = read_hf_params(out, jnp.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, spec.vocab - 1, (2, SEQ)).astype(np.int32)
    mask = np.zeros((2, SEQ), bool)
    mask[0, 5:] = True
    mask[1, 3:11] = mask[1, 14:] = True
    anchors = np.array([[1, 6, 12, SEQ - K], [2, 9, 15, SEQ - 3]], np.int32)   # last runs off
    anchor_valid = np.array([[True, True, True, True], [True, False, True, True]])
    batch = {"tokens": tokens, "mask": mask, "anchors": anchors, "anchor_valid": anchor_valid}
    return model, diff, cfg, params, batch


def torch_loss(model, diff, cfg, batch) -> tuple[float, int]:
    """(token-mean KL(teacher || student), supervised count) written independently in torch:
    teacher = HF's AR distribution at a+i, student = the oracle's block position i, supervised
    iff i < K-1, the anchor is valid and x_{a+i+1} is a response token inside the row."""
    total, count = 0.0, 0
    for r in range(batch["tokens"].shape[0]):
        row = batch["tokens"][r]
        ar = torch.log_softmax(torch.tensor(hf_logits(model, row[None])[0], dtype=torch.float64), -1)
        anchors = batch["anchors"][r]
        blocks = np.full((len(anchors), K), cfg.mask_token_id)
        blocks[:, 0] = row[anchors]
        student = torch.log_softmax(torch.tensor(
            diffusion_oracle(model, diff, row, blocks, anchors), dtype=torch.float64), -1)
        for b, a in enumerate(anchors):
            for i in range(K - 1):
                nxt = a + i + 1
                if batch["anchor_valid"][r, b] and nxt < SEQ and batch["mask"][r, nxt]:
                    total += float(torch.nn.functional.kl_div(
                        student[b, i], ar[a + i], log_target=True, reduction="sum"))
                    count += 1
    return total / count, count


def loss_and_grads(params, cfg, batch, opts):
    backbone, trainable = split_params(params)

    def loss(tr):
        terms = row_loss_terms(tr, backbone, cfg, batch, opts)
        return terms["kl_sum"] / terms["count"], terms["count"]

    (value, count), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return float(value), int(count), grads


def test_training_loss_matches_torch_kl_over_diffusion_oracle(setup):
    model, diff, cfg, params, batch = setup
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    ours, count, _ = loss_and_grads(params, cfg, jbatch, LossOptions(K, jnp.float32, False, 1))
    want, want_count = torch_loss(model, diff, cfg, batch)
    assert count == want_count and count >= 20
    assert want > 0.1                       # random _diff twins: the views really differ
    np.testing.assert_allclose(ours, want, rtol=2e-4)


def test_anchor_chunks_and_remat_keep_loss_and_gradients(setup):
    """anchor_chunks 1 vs 4 (one block per group) and remat on vs off: the same loss and the
    same (finite, nonzero) gradients of every _diff leaf, with a block running past the row end."""
    _, _, cfg, params, batch = setup
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    ref_loss, _, ref_grads = loss_and_grads(params, cfg, jbatch, LossOptions(K, jnp.float32, False, 1))
    for g in jax.tree_util.tree_leaves(ref_grads):
        assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0
    for chunks, remat in ((4, False), (1, True), (4, True)):
        loss, _, grads = loss_and_grads(params, cfg, jbatch, LossOptions(K, jnp.float32, remat, chunks))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"chunks {chunks} remat {remat}")
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                                       atol=1e-5 * float(jnp.abs(r).max()),
                                       err_msg=f"{jax.tree_util.keystr(path)} chunks {chunks} remat {remat}")
