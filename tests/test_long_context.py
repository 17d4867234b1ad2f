"""Long prompts: chunked prefill equals one-shot prefill; 3,000+ token prompts on the micro model
and an 8K prompt on a tiny 16K-position config equal HF transformers (fp32, sdpa) and give
Orthrus greedy == AR greedy; a prompt that does not fit the cache is a one-line error."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orthrus_jax.hf import read_hf_params
from infer import decoder
from infer.text import joined_prompt_ids, load_tokenizer
from orthrus_jax import init_cache, lm_logits
from orthrus_jax.config import Qwen3Config
from orthrus_jax.model import ar_forward, chunked_prefill, draft_block, prefill_forward
from orthrus_jax.params import init_params, unstack_layers
from tests.conftest import DEV_PROMPTS
from tests.hf_fixtures import randomize_, save_hf_model

REL_TOL = 1e-4
prefill_jit = jax.jit(chunked_prefill, static_argnums=(1, 5))
ar_jit = jax.jit(ar_forward, static_argnums=1)
logits_jit = jax.jit(lm_logits)


def long_prompt(model_dir, n_tokens: int) -> list[int]:
    """Dev prompts joined until n_tokens: built at test time from the test bed."""
    return joined_prompt_ids(load_tokenizer(str(model_dir)), str(DEV_PROMPTS), n_tokens)


def all_logits(params, cfg, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """Logits at every position of one row, the row fed through the cache chunk by chunk."""
    t = tokens.shape[1]
    cache = init_cache(cfg, 1, t, params["embed"].dtype)
    out = []
    for s in range(0, t, chunk):
        hidden, cache = ar_jit(params, cfg, jnp.asarray(tokens[:, s:s + chunk]), cache)
        cache = cache.replace(length=cache.length + hidden.shape[1])
        out.append(np.asarray(logits_jit(params, hidden)))
    return np.concatenate(out, axis=1)


def hf_sdpa_logits(hf_dir, tokens: np.ndarray) -> np.ndarray:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()


def assert_close(ours, ref, rel=REL_TOL):
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * logit scale {scale:.3g}"


def check_orthrus_equals_ar(params, cfg, prompt, max_new, chunk):
    kw = dict(max_new_tokens=max_new, batch_size=1, prefill_chunk_size=chunk, block_size=8)
    ar = decoder.generate(params, cfg, [prompt], mode="ar", **kw)[0]
    ort = decoder.generate(params, cfg, [prompt], mode="orthrus", **kw)[0]
    assert len(ar.token_ids) == max_new or ar.stats.finish_reason == "eos"
    assert ort.token_ids == ar.token_ids
    return ar


def test_chunked_prefill_equals_one_shot(micro_fp32):
    """Ragged rows (300 and 171 tokens) in a 400-token bucket: chunks of 64 (a partial chunk,
    and chunks of padding only, which are skipped) give the one-shot prefill's last hidden state
    and cache entries."""
    cfg, params = micro_fp32
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, cfg.vocab_size, (2, 400)).astype(np.int32)
    lens = jnp.asarray([300, 171], jnp.int32)
    outs = []
    for chunk in (400, 64):
        cache = init_cache(cfg, 2, 440, jnp.float32)
        outs.append(prefill_jit(params, cfg, jnp.asarray(tokens), lens, cache, chunk))
    (h1, c1), (h2, c2) = outs
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c2.length), [300, 171])
    for r, n in enumerate([300, 171]):
        np.testing.assert_allclose(np.asarray(c2.k[:, r, :n]), np.asarray(c1.k[:, r, :n]),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(c2.v[:, r, :n]), np.asarray(c1.v[:, r, :n]),
                                   atol=1e-5)


@pytest.mark.parametrize("layers,unstacked", [(2, False), (3, True), (1, False), (1, True)])
def test_prefill_forward_equals_ar_forward(layers, unstacked):
    """prefill_forward (the final layer run for one token per row) gives ar_forward's hidden
    state at that token and writes the same K/V: rows starting at ragged cache lengths over a
    cache of random entries, 80 tokens (the many-query prefill branch), and a kept token whose
    prefix crosses a 128-key decode chunk; stacked and per-layer weights, one and more layers."""
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    params = init_params(cfg, jax.random.PRNGKey(layers), jnp.float32)
    if unstacked:
        params = unstack_layers(params)
    rng = np.random.default_rng(layers)
    cache = init_cache(cfg, 3, 256, jnp.float32)
    cache = cache.replace(k=jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32),
                          v=jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32),
                          length=jnp.asarray([0, 9, 120], jnp.int32))
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (3, 80)), jnp.int32)
    last = jnp.asarray([79, 0, 30], jnp.int32)
    h_all, c_all = ar_jit(params, cfg, tokens, cache)
    h, c = jax.jit(prefill_forward, static_argnums=1)(params, cfg, tokens, cache, last)
    ref = np.asarray(h_all)[np.arange(3), np.asarray(last)]
    np.testing.assert_allclose(np.asarray(h), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c.k), np.asarray(c_all.k), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c.v), np.asarray(c_all.v), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c.length), np.asarray(cache.length))


def test_idle_row_given_visible_zero_reads_no_cache(micro_fp32):
    """`visible` (what the engine passes for idle slots): a row parked at the cache's end with
    visible 0 attends to its own block only, its writes are dropped, and the active row's hidden
    states, K/V and draft equal those it gets alone."""
    cfg, params = micro_fp32
    rng = np.random.default_rng(1)
    cache = init_cache(cfg, 2, 96, jnp.float32)
    cache = cache.replace(k=jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32),
                          v=jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32),
                          length=jnp.asarray([37, 96], jnp.int32))
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 4)), jnp.int32)
    visible = jnp.asarray([37, 0], jnp.int32)
    alone = cache.replace(k=cache.k[:, :1], v=cache.v[:, :1], length=cache.length[:1])
    h_both, c_both = ar_jit(params, cfg, tokens, cache, visible=visible)
    h_one, c_one = ar_jit(params, cfg, tokens[:1], alone)
    np.testing.assert_allclose(np.asarray(h_both[0]), np.asarray(h_one[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c_both.k[:, 0]), np.asarray(c_one.k[:, 0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c_both.k[:, 1]), np.asarray(cache.k[:, 1]))
    assert np.isfinite(np.asarray(h_both[1])).all()
    draft_jit = jax.jit(draft_block, static_argnums=(1, 4))
    d_both = draft_jit(params, cfg, tokens[:, 0], cache, 8, visible)
    d_one = draft_jit(params, cfg, tokens[:1, 0], alone, 8)
    np.testing.assert_allclose(np.asarray(d_both[0]), np.asarray(d_one[0]), atol=1e-5)
    assert np.isfinite(np.asarray(d_both[1])).all()


def test_micro_3000_token_prompt_matches_hf_and_orthrus_equals_ar(micro_fp32, micro_model_dir):
    cfg, params = micro_fp32
    prompt = long_prompt(micro_model_dir, 3000)
    tokens = np.asarray(prompt, np.int32)[None]
    assert_close(all_logits(params, cfg, tokens, 512), hf_sdpa_logits(micro_model_dir, tokens))
    check_orthrus_equals_ar(params, cfg, prompt, max_new=48, chunk=512)


@pytest.fixture(scope="module")
def tiny_16k(tmp_path_factory):
    """A tiny random Qwen3 (2 layers, width 32) with 16,384 positions, saved as an HF dir."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf_cfg = Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=16384, rms_norm_eps=1e-6, eos_token_id=0, pad_token_id=0,
        bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf_cfg).eval()
    randomize_(model, 0)
    out = save_hf_model(model, str(tmp_path_factory.mktemp("tiny16k")),
                        config_updates={"block_size": 8, "mask_token_id": 127})
    cfg, params = read_hf_params(out, jnp.float32)
    return out, cfg, params


def test_tiny_16k_config_8k_prompt_matches_hf_and_orthrus_equals_ar(tiny_16k):
    hf_dir, cfg, params = tiny_16k
    assert cfg.max_position_embeddings >= 16384
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 127, 8200).tolist()
    tokens = np.asarray(prompt, np.int32)[None]
    assert_close(all_logits(params, cfg, tokens, 1024), hf_sdpa_logits(hf_dir, tokens))
    check_orthrus_equals_ar(params, cfg, prompt, max_new=24, chunk=1024)


def test_prompt_that_does_not_fit_the_cache_is_one_line_error(tiny_16k):
    _, cfg, params = tiny_16k
    with pytest.raises(decoder.GenerationError) as e:
        decoder.generate(params, cfg, [[5] * 9000], max_new_tokens=16, max_len=9000)
    msg = str(e.value)
    assert "\n" not in msg and "9000 tokens" in msg and "9016" in msg and "holds 9000" in msg
    with pytest.raises(decoder.GenerationError, match="prefill_chunk_size must be >= 1"):
        decoder.generate(params, cfg, [[5]], max_new_tokens=4, prefill_chunk_size=0)
