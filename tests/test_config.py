"""Config parsing, the trainable split at real Qwen3 sizes, and shape runs at Qwen3-8B (no allocation)."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import pytest

from orthrus_jax import ar_forward, diffusion_forward, lm_logits
from orthrus_jax.cache import KVCache
from orthrus_jax.config import ConfigError, Qwen3Config, load_config
from orthrus_jax.params import (
    DIFF_KEYS, count_params, param_shapes, param_summary, split_params, trainable_fraction,
)
from orthrus_jax.shapes import shape_config


def qwen3_config(size: str, **extra) -> Qwen3Config:
    """A public Qwen3 size ('8B') from the one shape table, orthrus_jax.shapes."""
    return shape_config(f"qwen3-{size.lower()}", **extra)


@pytest.mark.parametrize("size,base,diff,share", [
    ("1.7B", 1.721e9, 352e6, 0.170), ("4B", 4.022e9, 944e6, 0.190), ("8B", 8.191e9, 1510e6, 0.156)])
def test_trainable_fraction_matches_method_table(size, base, diff, share):
    """Method doc table 1.2: base and _diff parameter counts and share of (base + diff)."""
    cfg = qwen3_config(size)
    backbone, trainable = split_params(param_shapes(cfg))
    assert count_params(backbone) == pytest.approx(base, rel=1e-3)
    assert count_params(trainable) == pytest.approx(diff, rel=2e-3)
    assert round(trainable_fraction(cfg), 3) == share
    assert f"({100 * share:.1f} % trainable)" in param_summary(cfg)


def test_param_summary_line_for_qwen3_8b():
    """The line that convert, train.run, train.memcheck and bench.gpu print: the paper's "16 %"."""
    assert param_summary(qwen3_config("8B")) == (
        "parameters: 9.701B = frozen backbone 8.191B + trainable _diff 1.510B (15.6 % trainable)")


@pytest.mark.parametrize("size", ["0.6B", "1.7B", "4B", "8B", "14B", "32B"])
@pytest.mark.parametrize("greedy", [True, False])
def test_decoder_code_paths_at_every_qwen3_size(size, greedy):
    """jax.eval_shape of the decoder's prefill and one Orthrus cycle (K 32, bf16, batch 2) at
    every public Qwen3 size, 0.6B (head_dim 128 != hidden / heads) to 32B: the same code, no
    weights allocated."""
    from infer import decoder

    cfg = qwen3_config(size)
    params = param_shapes(cfg, jnp.bfloat16)
    spec = decoder.make_spec(cfg, max_new_tokens=256, temperature=0.0 if greedy else 0.7,
                             top_k=0 if greedy else 20, top_p=1.0 if greedy else 0.8)
    batch, prompt = 2, 512
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    sampling = decoder.Sampling.make(0.7, 0.8)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    cache = jax.eval_shape(lambda: decoder.empty_cache(spec, batch, prompt, jnp.bfloat16))
    state = jax.eval_shape(
        lambda p, c, t, n, m, k: decoder.prefill_fn(p, spec, c, t, n, m, sampling, k),
        params, cache, i32(batch, prompt), i32(batch), i32(batch), key)
    assert state.cache.k.shape == (cfg.num_layers, batch, spec.cache_len(prompt),
                                   cfg.num_kv_heads, cfg.head_dim)
    assert state.cache.k.dtype == jnp.bfloat16
    after = jax.eval_shape(lambda p, st: decoder.step_fn(p, spec, st, sampling), params, state)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), after) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state)  # a while_loop carry


def test_trainable_tree_is_exactly_the_diff_twins():
    cfg = qwen3_config("8B")
    _, trainable = split_params(param_shapes(cfg))
    assert set(trainable) == {"layers"}
    assert set(trainable["layers"]) == {"q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff",
                                        "q_norm_diff", "k_norm_diff"} == set(DIFF_KEYS)
    assert all(x.shape[0] == cfg.num_layers for x in trainable["layers"].values())


def test_code_paths_at_qwen3_8b_shapes_without_allocating():
    """jax.eval_shape of the AR forward and both diffusion forms at Qwen3-8B shapes."""
    cfg = qwen3_config("8B")
    params = param_shapes(cfg, jnp.bfloat16)
    seq, batch, k = 2048, 2, cfg.block_size
    kv = jax.ShapeDtypeStruct((cfg.num_layers, batch, seq + k + 1, cfg.num_kv_heads, cfg.head_dim),
                              jnp.bfloat16)
    cache = KVCache(k=kv, v=kv, length=jax.ShapeDtypeStruct((batch,), jnp.int32))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    hidden, new_cache = jax.eval_shape(lambda p, t, c: ar_forward(p, cfg, t, c), params,
                                       i32(batch, seq), cache)
    assert hidden.shape == (batch, seq, 4096) and new_cache.k.shape == kv.shape
    logits = jax.eval_shape(lm_logits, params, hidden)
    assert logits.shape == (batch, seq, 151936) and logits.dtype == jnp.float32
    n_blocks = 256  # training form: 256 anchors x 32 per 2048-token row
    train_hidden = jax.eval_shape(
        lambda p, t, pos, pk, pv, pl: diffusion_forward(p, cfg, t, pos, pk, pv, pl, remat=True),
        params, i32(1, n_blocks, k), i32(1, n_blocks, k),
        jax.ShapeDtypeStruct((cfg.num_layers, 1, seq, 8, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((cfg.num_layers, 1, seq, 8, 128), jnp.bfloat16), i32(1, n_blocks))
    assert train_hidden.shape == (1, n_blocks, k, 4096)
    from orthrus_jax import draft_block

    draft = jax.eval_shape(lambda p, a, c: draft_block(p, cfg, a, c), params, i32(batch), cache)
    assert draft.shape == (batch, k, 4096)


# --- config.json parsing


def test_unknown_rope_scaling_refused():
    with pytest.raises(ConfigError, match="rope_scaling.*yarn"):
        qwen3_config("8B", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="field rope_parameters.*linear"):
        qwen3_config("8B", rope_parameters={"type": "linear", "factor": 2.0, "rope_theta": 1e6})
    with pytest.raises(ConfigError, match="field rope_scaling must be an object"):
        qwen3_config("8B", rope_scaling="yarn")


@pytest.mark.parametrize("fields,match", [
    ({"num_hidden_layers": "six"}, "field num_hidden_layers must be an integer, got 'six'"),
    ({"num_key_value_heads": 2.5}, "field num_key_value_heads must be an integer"),
    ({"hidden_size": True}, "field hidden_size must be an integer"),
    ({"rms_norm_eps": "1e-6"}, "field rms_norm_eps must be a number"),
    ({"rope_theta": "big"}, "field rope_theta must be a positive number"),
    ({"eos_token_id": ["a"]}, "field eos_token_id must be an integer or a list"),
    ({"tie_word_embeddings": "yes"}, "field tie_word_embeddings must be true or false"),
    ({"mask_token_id": "<mask>"}, "field mask_token_id must be an integer"),
])
def test_malformed_values_named(fields, match):
    with pytest.raises(ConfigError, match=match):
        qwen3_config("8B", **fields)


def test_absent_fields_take_transformers_defaults():
    """head_dim, RoPE theta and positions default as in transformers' Qwen3Config (an absent
    num_key_value_heads means plain multi-head attention here, as HF's None does)."""
    from transformers import Qwen3Config as HFQwen3Config

    fields = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 1, "num_attention_heads": 4}
    ours = Qwen3Config.from_hf_dict({"model_type": "qwen3", **fields})
    theirs = HFQwen3Config(**fields)
    assert ours.head_dim == theirs.head_dim == 128
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.num_kv_heads == HFQwen3Config(**fields, num_key_value_heads=None).num_key_value_heads


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3_moe", None])
def test_unknown_model_type_refused(model_type):
    with pytest.raises(ConfigError, match="model_type"):
        qwen3_config("8B", model_type=model_type)


@pytest.mark.parametrize("fields,match", [
    ({"num_key_value_heads": 5}, "num_attention_heads"),
    ({"head_dim": 127}, "head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"mask_token_id": 151936}, "mask_token_id"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_inconsistent_shapes_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        qwen3_config("8B", **fields)


def test_missing_field_named():
    with pytest.raises(ConfigError, match="x/config.json: missing field intermediate_size"):
        Qwen3Config.from_hf_dict({"model_type": "qwen3", "vocab_size": 8, "hidden_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 1},
                                 source="x/config.json")


def test_mask_id_from_tokenizer_mask_token(micro_model_dir):
    cfg = load_config(str(micro_model_dir))
    assert cfg.mask_token_id == 1 and cfg.block_size == 32 and cfg.eos_token_ids == (0,)
    assert cfg.head_dim == 64 and cfg.hidden_size == 192 and cfg.tie_word_embeddings


def test_mask_id_defaults_to_len_tokenizer(micro_model_dir, tmp_path):
    """A tokenizer without a mask token: the mask id is len(tokenizer) (Qwen3's 151669)."""
    d = tmp_path / "m"
    shutil.copytree(micro_model_dir, d)
    (d / "tokenizer_config.json").chmod(0o644)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    del tok_cfg["mask_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (d / "config.json").chmod(0o644)
    hf = json.loads((d / "config.json").read_text())
    hf["vocab_size"] = 8200  # an embedding with unused rows past the tokenizer, as in Qwen3
    (d / "config.json").write_text(json.dumps(hf))
    assert load_config(str(d)).mask_token_id == 8192


def test_null_mask_id_falls_back_to_tokenizer(micro_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(micro_model_dir, d)
    (d / "config.json").chmod(0o644)
    hf = json.loads((d / "config.json").read_text())
    hf["mask_token_id"] = None
    (d / "config.json").write_text(json.dumps(hf))
    assert load_config(str(d)).mask_token_id == 1  # the tokenizer's <|mask|>


def test_eos_ids_from_generation_config(micro_model_dir, tmp_path):
    """HF generate stops on generation_config.json's eos ids (Qwen3: <|im_end|> and
    <|endoftext|>); so does the decoder. The written config.json keeps its own value."""
    from orthrus_jax.checkpoint import read_source_config

    d = tmp_path / "m"
    shutil.copytree(micro_model_dir, d)
    (d / "generation_config.json").chmod(0o644)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [0, 5]
    (d / "generation_config.json").write_text(json.dumps(gen))
    cfg = load_config(str(d))
    assert cfg.eos_token_ids == (0, 5)
    assert cfg.to_hf_dict(base=read_source_config(str(d)))["eos_token_id"] == 0
    gen["eos_token_id"] = "eos"
    (d / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ConfigError, match="generation_config.json: field eos_token_id"):
        load_config(str(d))


def test_orthrus_config_fields_read(micro_model_dir, tmp_path):
    """block_size and mask_token_id from an Orthrus config.json win over the defaults."""
    d = tmp_path / "m"
    shutil.copytree(micro_model_dir, d)
    (d / "config.json").chmod(0o644)
    hf = json.loads((d / "config.json").read_text())
    hf.update(architectures=["OrthrusLM"], block_size=16, mask_token_id=5, r=16, lora_alpha=32)
    (d / "config.json").write_text(json.dumps(hf))
    cfg = load_config(str(d))
    assert cfg.block_size == 16 and cfg.mask_token_id == 5
    back = Qwen3Config.from_hf_dict(cfg.to_hf_dict())
    assert back == cfg and cfg.to_hf_dict()["architectures"] == ["OrthrusLM"]


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        load_config(str(tmp_path))
