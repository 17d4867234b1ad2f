"""The one table of public Qwen3 shapes (0.6B to 32B), for benchmarks, memory checks and tests.

Shape fields as the public config.json files give them; every size shares vocab 151,936,
head_dim 128, RoPE theta 1e6 and 40,960 positions. The mask token is Qwen3's unused row 151669.
`tiny` is a random-weight shape small enough for the CPU.
"""
from __future__ import annotations

from typing import Any

from orthrus_jax.config import Qwen3Config

QWEN3_VOCAB = 151936
QWEN3_MASK_TOKEN_ID = 151669

QWEN3_HF_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
QWEN3_SIZES = tuple(QWEN3_HF_SHAPES)

TINY = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=True,
                   max_position_embeddings=4096, block_size=8, mask_token_id=511)


def qwen3_hf_config(name: str, **extra: Any) -> dict[str, Any]:
    """The config.json dict of a public Qwen3 size (`extra` fields override)."""
    if name not in QWEN3_HF_SHAPES:
        raise KeyError(f"unknown Qwen3 shape {name!r}; choose from {', '.join(QWEN3_SIZES)}")
    return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": QWEN3_VOCAB, "head_dim": 128, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 40960, **QWEN3_HF_SHAPES[name], **extra}


def shape_config(name: str, **extra: Any) -> Qwen3Config:
    """A Qwen3Config by name: a public size (`qwen3-8b`) or `tiny`."""
    if name == "tiny" and not extra:
        return TINY
    return Qwen3Config.from_hf_dict(qwen3_hf_config(name, **extra),
                                    default_mask_token_id=QWEN3_MASK_TOKEN_ID)


SHAPE_NAMES = (*QWEN3_SIZES, "tiny")
