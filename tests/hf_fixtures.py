"""Test helpers: random tiny HF Qwen3 checkpoints and torch oracles built from HF's own modules.

Nothing here imports orthrus_jax: the oracles must stay independent of the code they check.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb, repeat_kv

DIFF_LINEARS = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff")
DIFF_NORMS = ("q_norm_diff", "k_norm_diff")


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """A random Qwen3 shape. head_dim need not be hidden / heads."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    layers: int = 2
    vocab: int = 160
    intermediate: int = 96

    def hf_config(self) -> Qwen3Config:
        return Qwen3Config(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            tie_word_embeddings=self.tied, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            rms_norm_eps=1e-6, eos_token_id=0, pad_token_id=0, bos_token_id=None)


# GQA ratios 1, 2 and 4; tied and untied; head_dim != hidden / heads in two of three.
TINY_SPECS = (
    TinySpec("tied-gqa1", hidden=64, heads=4, kv_heads=4, head_dim=32, tied=True),
    TinySpec("untied-gqa2", hidden=64, heads=4, kv_heads=2, head_dim=16, tied=False),
    TinySpec("untied-gqa4", hidden=48, heads=8, kv_heads=2, head_dim=24, tied=False, layers=3),
)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norms around 1 too), so a swapped or dropped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def random_diff_weights(model: Qwen3ForCausalLM, seed: int) -> dict[str, torch.Tensor]:
    """Random (not copied) _diff twins under their official HF names."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in DIFF_LINEARS:
            w = getattr(attn, name[: -len("_diff")]).weight
            out[f"model.layers.{i}.self_attn.{name}.weight"] = (
                torch.randn(w.shape, generator=gen) / w.shape[-1] ** 0.5).to(w.dtype)
        for name in DIFF_NORMS:
            w = getattr(attn, name[: -len("_diff")]).weight
            out[f"model.layers.{i}.self_attn.{name}.weight"] = (
                1.0 + 0.2 * torch.randn(w.shape, generator=gen)).to(w.dtype)
    return out


def make_hf_model(spec: TinySpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(spec.hf_config()).eval()
    model.config._attn_implementation = "eager"
    randomize_(model, seed)
    return model.to(dtype)


def save_hf_model(model: Qwen3ForCausalLM, out_dir: str, *, max_shard_size: str | None = None,
                  diff: dict[str, torch.Tensor] | None = None,
                  config_updates: dict[str, Any] | None = None) -> str:
    """save_pretrained (optionally sharded), then optionally add _diff tensors / config fields."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if diff:
        single = os.path.join(out_dir, "model.safetensors")
        assert os.path.exists(single), "diff tensors are added to single-file checkpoints only"
        tensors = load_file(single)
        tensors.update({k: v.contiguous() for k, v in diff.items()})
        save_file(tensors, single, metadata={"format": "pt"})
    if config_updates:
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(config_updates)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    return out_dir


@torch.no_grad()
def hf_logits(model: Qwen3ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Plain HF forward logits [B, T, V] in fp32."""
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def diffusion_oracle(model: Qwen3ForCausalLM, diff: dict[str, torch.Tensor], row: np.ndarray,
                     blocks: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Orthrus diffusion-view logits [N, K, V] for one row, written layer by layer in torch.

    row [L]: the clean tokens; the AR view runs over them (HF model, use_cache) and gives each
    layer's K/V (after k_norm and RoPE). blocks [N, K]: block tokens at positions
    anchors[n] + 0..K-1. Per layer, the block hidden states go through HF's own input norm, the
    _diff projections and a Qwen3RMSNorm holding q/k_norm_diff, HF's RoPE, then one softmax over
    keys [AR keys of the row | all N*K block keys] under an explicit additive mask (the official
    dual-pass mask: AR key s visible iff s < anchor of the query's block; block keys visible iff
    in the same block), then o_proj_diff, HF's post-attention norm and MLP.
    """
    cfg = model.config
    n_blocks, k_size = blocks.shape
    seq = len(row)
    ar = model(torch.as_tensor(row[None], dtype=torch.long), use_cache=True)
    cache = ar.past_key_values
    tokens = torch.as_tensor(blocks.reshape(1, -1), dtype=torch.long)
    positions = torch.as_tensor((anchors[:, None] + np.arange(k_size)[None]).reshape(1, -1))
    x = model.model.embed_tokens(tokens)
    cos, sin = model.model.rotary_emb(x, positions)
    block_of_query = torch.arange(n_blocks).repeat_interleave(k_size)
    anchor_of_query = torch.as_tensor(anchors)[block_of_query]
    ar_visible = torch.arange(seq)[None, :] < anchor_of_query[:, None]
    block_visible = block_of_query[:, None] == block_of_query[None, :]
    visible = torch.cat([ar_visible, block_visible], dim=1)
    mask = torch.zeros(visible.shape, dtype=x.dtype).masked_fill(~visible, float("-inf"))
    head_dim = cfg.head_dim
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        def w(name: str) -> torch.Tensor:
            return diff[f"model.layers.{i}.self_attn.{name}.weight"].to(x.dtype)

        q_norm = Qwen3RMSNorm(head_dim, eps=cfg.rms_norm_eps).to(x.dtype)
        k_norm = Qwen3RMSNorm(head_dim, eps=cfg.rms_norm_eps).to(x.dtype)
        q_norm.weight.copy_(w("q_norm_diff"))
        k_norm.weight.copy_(w("k_norm_diff"))
        h = layer.input_layernorm(x)
        shape = (1, h.shape[1], -1, head_dim)
        q = q_norm((h @ w("q_proj_diff").T).view(shape)).transpose(1, 2)
        k = k_norm((h @ w("k_proj_diff").T).view(shape)).transpose(1, 2)
        v = (h @ w("v_proj_diff").T).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys = torch.cat([cache.layers[i].keys, k], dim=2)
        values = torch.cat([cache.layers[i].values, v], dim=2)
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        scores = (q @ keys.transpose(2, 3)) * head_dim ** -0.5 + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        attn = (probs @ values).transpose(1, 2).reshape(1, h.shape[1], -1)
        x = x + attn @ w("o_proj_diff").T
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.lm_head(model.model.norm(x)).float()
    return logits.reshape(n_blocks, k_size, -1).numpy()


def diff_state(model_dir: str) -> dict[str, torch.Tensor]:
    """The _diff tensors stored in a single-file checkpoint."""
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    return {k: v for k, v in tensors.items() if "_diff" in k}
