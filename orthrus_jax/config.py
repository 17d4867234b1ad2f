"""Model configuration: a frozen, hashable dataclass read from an HF config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

DEFAULT_BLOCK_SIZE = 32


class ConfigError(ValueError):
    """A config.json that this library cannot serve; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Static Qwen3 shape plus the Orthrus fields (block size K and the mask token)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960
    block_size: int = DEFAULT_BLOCK_SIZE
    mask_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config field num_attention_heads={self.num_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config field head_dim={self.head_dim} must be even for RoPE")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"config field mask_token_id={self.mask_token_id} is outside the "
                              f"embedding table of vocab_size={self.vocab_size}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json",
                     default_mask_token_id: int | None = None) -> "Qwen3Config":
        """Build from a parsed HF config; refuse what the model cannot run, naming the field."""
        model_type = hf.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(f"{source}: field model_type is {model_type!r}; only 'qwen3' is supported")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field rope_scaling has rope_type {rope_type!r}; "
                              "only the default RoPE is supported")
        theta = rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: field use_sliding_window is true; sliding-window attention "
                              "is not supported")
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: field attention_bias is true; Qwen3 has no attention bias")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: field hidden_act is {act!r}; only 'silu' is supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing field {missing[0]}")
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        mask_id = hf.get("mask_token_id", default_mask_token_id)
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads", heads)),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40_960)),
                block_size=int(hf.get("block_size", DEFAULT_BLOCK_SIZE)),
                mask_token_id=int(mask_id if mask_id is not None else hf["vocab_size"] - 1),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self, *, orthrus: bool = True, dtype: str = "bfloat16") -> dict[str, Any]:
        """The HF config.json for this shape; with orthrus=True, the OrthrusLM form."""
        out: dict[str, Any] = {
            "architectures": ["OrthrusLM" if orthrus else "Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": dtype,
        }
        if orthrus:
            out["block_size"] = self.block_size
            out["mask_token_id"] = self.mask_token_id
        return out


def tokenizer_mask_token_id(model_dir: str) -> int | None:
    """The mask id from the tokenizer files: its mask token, else len(tokenizer) (Qwen3's unused row)."""
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        return None
    tok_cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    mask_token = None
    if os.path.exists(tok_cfg_path):
        with open(tok_cfg_path) as f:
            mask_token = json.load(f).get("mask_token")
        if isinstance(mask_token, dict):
            mask_token = mask_token.get("content")
    from tokenizers import Tokenizer  # local import: config parsing must not need it otherwise

    tok = Tokenizer.from_file(tok_path)
    if mask_token is not None:
        mask_id = tok.token_to_id(mask_token)
        if mask_id is not None:
            return mask_id
    return tok.get_vocab_size(with_added_tokens=True)


def load_config(model_dir: str) -> Qwen3Config:
    """Read MODEL_DIR/config.json (HF or Orthrus form) with the tokenizer's mask token as default."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: model directory does not exist")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    default_mask = None if "mask_token_id" in hf else tokenizer_mask_token_id(model_dir)
    return Qwen3Config.from_hf_dict(hf, source=path, default_mask_token_id=default_mask)
