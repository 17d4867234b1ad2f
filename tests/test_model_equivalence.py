"""The JAX model against HF transformers (AR view) and a torch oracle (diffusion view).

Tolerances: fp32 comparisons require max |ours - reference| <= 1e-4 * max |reference logit|.
"""
from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orthrus_jax.hf import read_hf_params
from orthrus_jax import ar_forward, diffusion_forward, draft_block, init_cache, lm_logits
from orthrus_jax.model import causal_forward
from orthrus_jax.params import cast_params
from tests.conftest import DEV_PROMPTS
from tests.hf_fixtures import (
    TINY_SPECS, diffusion_oracle, hf_logits, make_hf_model, random_diff_weights, save_hf_model,
)

REL_TOL = 1e-4

ar_jit = jax.jit(ar_forward, static_argnums=1)
diffusion_jit = jax.jit(diffusion_forward, static_argnums=1)
draft_jit = jax.jit(draft_block, static_argnums=(1, 4))
logits_jit = jax.jit(lm_logits)


def assert_logits_close(ours, ref, rel=REL_TOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * logit scale {scale:.3g}"


def full_logits(params, cfg, tokens):
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], params["embed"].dtype)
    hidden, cache = ar_jit(params, cfg, jnp.asarray(tokens, jnp.int32), cache)
    return np.asarray(logits_jit(params, hidden)), cache


@pytest.fixture(scope="module", params=TINY_SPECS, ids=lambda s: s.name)
def tiny(request, tmp_path_factory):
    """(spec, HF fp32 model, its _diff tensors, our cfg, our fp32 params read from the saved dir)."""
    spec = request.param
    model = make_hf_model(spec, seed=hash(spec.name) % 1000)
    diff = random_diff_weights(model, seed=7)
    out = save_hf_model(model, str(tmp_path_factory.mktemp(spec.name)), diff=diff)
    cfg, params = read_hf_params(out, jnp.float32)
    return spec, model, diff, cfg, params


@pytest.fixture(scope="module")
def micro_hf_fp32(micro_model_dir):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(micro_model_dir), dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


@pytest.fixture(scope="module")
def long_text_tokens(micro_model_dir):
    """~500 real tokens (held-out Python source) for the micro model."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(micro_model_dir / "tokenizer.json"))
    ids: list[int] = []
    with open(DEV_PROMPTS) as f:
        for line in f:
            ids += tok.encode(json.loads(line)["prompt"]).ids
            if len(ids) >= 512:
                break
    return np.asarray(ids[:512], np.int32)[None]


def test_ar_logits_match_hf_tiny(tiny):
    """fp32 AR logits equal HF Qwen3ForCausalLM on random tied/untied, GQA 1/2/4 configs."""
    spec, model, _, cfg, params = tiny
    tokens = np.random.default_rng(0).integers(0, spec.vocab, (2, 48))
    ours, _ = full_logits(params, cfg, tokens)
    assert_logits_close(ours, hf_logits(model, tokens))


def test_ar_logits_match_hf_micro_long(micro_fp32, micro_hf_fp32, long_text_tokens):
    """fp32 AR logits over a 512-token prompt (long enough to expose RoPE errors) equal HF's."""
    cfg, params = micro_fp32
    ours, _ = full_logits(params, cfg, long_text_tokens)
    assert_logits_close(ours, hf_logits(micro_hf_fp32, long_text_tokens))


def _kl_and_top1(ref_logits, logits):
    ref = torch.log_softmax(torch.as_tensor(ref_logits, dtype=torch.float64), -1)
    ours = torch.log_softmax(torch.as_tensor(np.asarray(logits, np.float64)), -1)
    kl = (ref.exp() * (ref - ours)).sum(-1)
    top1 = (ref.argmax(-1) == ours.argmax(-1)).double().mean()
    return float(kl.mean()), float(kl.max()), float(top1)


def test_ar_bf16_matches_hf_fp32_by_kl(micro_fp32, micro_hf_fp32, long_text_tokens):
    """bf16 weights and activations against the HF fp32 reference, over 512 tokens.

    Tolerance: mean KL(p_HF_fp32 || p_ours_bf16) <= 2e-3 nats, max KL <= 5e-2 nats, and top-1
    agreement >= 97 %. HF's own bf16 forward is measured the same way and must be no better than
    half our error (so the bound tracks bf16 rounding, not a hidden bug).
    """
    cfg, params = micro_fp32
    ref = hf_logits(micro_hf_fp32, long_text_tokens)
    ours, _ = full_logits(cast_params(params, jnp.bfloat16), cfg, long_text_tokens)
    kl_mean, kl_max, top1 = _kl_and_top1(ref, ours)
    # a copy: casting the shared fixture to bf16 and back would round its weights for later tests
    hf_bf16 = hf_logits(copy.deepcopy(micro_hf_fp32).to(torch.bfloat16), long_text_tokens)
    hf_kl_mean, _, _ = _kl_and_top1(ref, hf_bf16)
    assert kl_mean <= 2e-3 and kl_max <= 5e-2 and top1 >= 0.97, (kl_mean, kl_max, top1)
    assert kl_mean <= 2 * hf_kl_mean + 1e-4, (kl_mean, hf_kl_mean)


def _check_prefill_then_cached_steps(params, cfg, rows: np.ndarray) -> None:
    """Prefill + one-token cached steps equal one full forward, with rows at different lengths.

    Row 0 prefills 24 tokens; row 1 prefills the same 24 but commits only 19 (ragged lengths:
    its last 5 cache entries are stale and get overwritten). Both then step one token at a time.
    """
    full, _ = full_logits(params, cfg, rows)
    cache = init_cache(cfg, 2, 64, jnp.float32)
    hidden, cache = ar_jit(params, cfg, jnp.asarray(rows[:, :24]), cache)
    pre = np.asarray(logits_jit(params, hidden))
    assert_logits_close(pre, full[:, :24])
    lengths = np.array([24, 19])
    cache = cache.replace(length=jnp.asarray(lengths, jnp.int32))
    for _ in range(12):
        step_tokens = rows[np.arange(2), lengths][:, None]
        hidden, cache = ar_jit(params, cfg, jnp.asarray(step_tokens, jnp.int32), cache)
        step = np.asarray(logits_jit(params, hidden))[:, 0]
        assert_logits_close(step, full[np.arange(2), lengths])
        lengths = lengths + 1
        cache = cache.replace(length=jnp.asarray(lengths, jnp.int32))


def test_prefill_then_cached_steps_equal_full_forward_ragged(micro_fp32, long_text_tokens):
    cfg, params = micro_fp32
    seq = long_text_tokens[0, :40]
    _check_prefill_then_cached_steps(params, cfg, np.stack([seq, np.roll(seq, 3)]))


def test_prefill_then_cached_steps_tiny(tiny):
    """The same on the random tied/untied, GQA 1/2/4 configs."""
    spec, _, _, cfg, params = tiny
    _check_prefill_then_cached_steps(params, cfg,
                                     np.random.default_rng(4).integers(0, spec.vocab, (2, 40)))


def test_diffusion_training_form_matches_oracle(tiny):
    """Training form (N blocks per row, per-block prefix_len = anchor) equals the torch oracle."""
    spec, model, diff, cfg, params = tiny
    rng = np.random.default_rng(1)
    k_size, seq = 8, 40
    rows = rng.integers(0, spec.vocab, (2, seq))
    anchors = np.array([[1, 9, 20], [5, 17, 32]])  # 1 <= a <= L - K, several blocks per row
    blocks = np.full((2, 3, k_size), cfg.mask_token_id)
    blocks[:, :, 0] = np.take_along_axis(rows, anchors, 1)
    positions = anchors[..., None] + np.arange(k_size)
    _, cache = full_logits(params, cfg, rows)
    hidden = diffusion_jit(params, cfg, jnp.asarray(blocks, jnp.int32),
                           jnp.asarray(positions, jnp.int32), cache.k, cache.v,
                           jnp.asarray(anchors, jnp.int32))
    ours = np.asarray(logits_jit(params, hidden))
    for r in range(2):
        assert_logits_close(ours[r], diffusion_oracle(model, diff, rows[r], blocks[r], anchors[r]))


def test_draft_block_matches_oracle_ragged(tiny):
    """Inference form (draft_block, N = 1 over the KV cache) equals the oracle; ragged rows."""
    spec, model, diff, cfg, params = tiny
    rng = np.random.default_rng(2)
    k_size, seq = 8, 30
    rows = rng.integers(0, spec.vocab, (2, seq))
    lengths = np.array([21, 13])  # the anchor sits at each row's cache length
    cache = init_cache(cfg, 2, seq + k_size + 1, jnp.float32)
    _, cache = ar_jit(params, cfg, jnp.asarray(rows, jnp.int32), cache)
    cache = cache.replace(length=jnp.asarray(lengths, jnp.int32))
    anchor = rows[np.arange(2), lengths]
    hidden = draft_jit(params, cfg, jnp.asarray(anchor, jnp.int32), cache, k_size)
    ours = np.asarray(logits_jit(params, hidden))
    for r in range(2):
        block = np.full((1, k_size), cfg.mask_token_id)
        block[0, 0] = anchor[r]
        ref = diffusion_oracle(model, diff, rows[r, : lengths[r]], block, lengths[r:r + 1])
        assert_logits_close(ours[r], ref[0])


@pytest.fixture(scope="module")
def micro_random_diff(micro_hf_fp32, tmp_path_factory):
    """micro-qwen3 with random _diff twins: (HF model, _diff tensors, our cfg, our fp32 params)."""
    diff = random_diff_weights(micro_hf_fp32, seed=11)
    out = save_hf_model(micro_hf_fp32, str(tmp_path_factory.mktemp("micro-diff")), diff=diff)
    cfg, params = read_hf_params(out, jnp.float32)
    return micro_hf_fp32, diff, cfg, params


def test_both_diffusion_forms_match_oracle_micro(micro_random_diff, long_text_tokens):
    """On the real micro model (K = 32, its mask token): training form with 3 blocks per row,
    and the inference form over a cache, both equal the torch oracle."""
    model, diff, cfg, params = micro_random_diff
    k_size, row = cfg.block_size, long_text_tokens[0, :160]
    anchors = np.array([[7, 60, 121]])
    blocks = np.full((1, 3, k_size), cfg.mask_token_id)
    blocks[0, :, 0] = row[anchors[0]]
    positions = anchors[..., None] + np.arange(k_size)
    _, cache = full_logits(params, cfg, row[None])
    hidden = diffusion_jit(params, cfg, jnp.asarray(blocks, jnp.int32),
                           jnp.asarray(positions, jnp.int32), cache.k, cache.v,
                           jnp.asarray(anchors, jnp.int32))
    ours = np.asarray(logits_jit(params, hidden))[0]
    assert_logits_close(ours, diffusion_oracle(model, diff, row, blocks[0], anchors[0]))
    length = 100
    cache = init_cache(cfg, 1, length + k_size + 1, jnp.float32)
    _, cache = ar_jit(params, cfg, jnp.asarray(row[None, :length], jnp.int32), cache)
    cache = cache.replace(length=jnp.asarray([length], jnp.int32))
    hidden = draft_jit(params, cfg, jnp.asarray(row[length:length + 1], jnp.int32), cache, k_size)
    block = np.full((1, k_size), cfg.mask_token_id)
    block[0, 0] = row[length]
    assert_logits_close(np.asarray(logits_jit(params, hidden))[0],
                        diffusion_oracle(model, diff, row[:length], block, np.array([length]))[0])


def test_diffusion_view_uses_diff_weights(tiny):
    """Guard for the oracle tests: with random _diff twins the two views must differ."""
    spec, model, diff, cfg, params = tiny
    assert not np.allclose(params["layers"]["q_proj"], params["layers"]["q_proj_diff"])


@pytest.mark.parametrize("tiny", [TINY_SPECS[1]], indirect=True, ids=lambda s: s.name)
def test_dual_pass_mask_causality_by_gradient(tiny):
    """Block b's diffusion output has zero gradient w.r.t. what it may not see, nonzero otherwise.

    Every AR position and every block slot gets its own token id, so the gradient w.r.t. an
    embedding row is the gradient w.r.t. that one input. Block b may see AR tokens at positions
    < anchor_b (through the AR K/V) and its own block; never AR tokens >= anchor_b or other blocks.
    """
    spec, _, _, cfg, params = tiny
    k_size, seq = 4, 24
    anchors = np.array([[3, 10, 17]])
    n_blocks = anchors.shape[1]
    ids = np.random.default_rng(3).permutation(spec.vocab)[: seq + n_blocks * k_size]
    rows = ids[:seq][None]
    blocks = ids[seq:].reshape(1, n_blocks, k_size)
    positions = anchors[..., None] + np.arange(k_size)

    def block_outputs(embed):
        p = {**params, "embed": embed}
        _, row_k, row_v = causal_forward(p, cfg, jnp.asarray(rows, jnp.int32))  # as training
        hidden = diffusion_forward(p, cfg, jnp.asarray(blocks, jnp.int32),
                                   jnp.asarray(positions, jnp.int32), row_k, row_v,
                                   jnp.asarray(anchors, jnp.int32))
        return jnp.sum(hidden[0] ** 2, axis=(1, 2))  # one scalar per block

    jac = np.abs(np.asarray(jax.jit(jax.jacrev(block_outputs))(params["embed"]))).sum(-1)
    for b in range(n_blocks):
        g = jac[b]
        ar_g = g[rows[0]]
        assert np.all(ar_g[: anchors[0, b]] > 0), f"block {b} misses a visible AR token"
        assert np.all(ar_g[anchors[0, b]:] == 0), f"block {b} sees AR tokens at or after its anchor"
        for other in range(n_blocks):
            block_g = g[blocks[0, other]]
            if other == b:
                assert np.all(block_g > 0), f"block {b} misses one of its own tokens"
            else:
                assert np.all(block_g == 0), f"block {b} sees block {other}"
