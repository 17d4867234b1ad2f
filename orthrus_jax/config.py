"""Model configuration: a frozen, hashable dataclass read from an HF config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

DEFAULT_BLOCK_SIZE = 32
HF_DEFAULT_HEAD_DIM = 128  # transformers' Qwen3Config defaults for absent fields
HF_DEFAULT_ROPE_THETA = 10_000.0
HF_DEFAULT_MAX_POSITIONS = 32_768


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
        """Build from a parsed HF config; refuse what the model cannot run, naming the field.

        Absent optional fields take transformers' Qwen3Config defaults (head_dim 128, RoPE theta
        10,000, 32,768 positions), so a config means here what it means to HF.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: not a JSON object")
        model_type = hf.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(f"{source}: field model_type is {model_type!r}; only 'qwen3' is supported")
        theta = _rope_theta(hf, source)
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

        def integer(name: str, default: int | None = None) -> int:
            value = hf.get(name)
            if value is None and default is not None:
                return default
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: field {name} must be an integer, got {value!r}")
            return value

        def number(name: str, default: float) -> float:
            value = hf.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: field {name} must be a number, got {value!r}")
            return float(value)

        heads = integer("num_attention_heads")
        eos_ids = eos_token_ids(hf.get("eos_token_id"), source)
        # mask id: the config's, else the tokenizer's (load_config), else the last embedding row
        mask_default = (default_mask_token_id if default_mask_token_id is not None
                        else integer("vocab_size") - 1)
        tie = hf.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"{source}: field tie_word_embeddings must be true or false, "
                              f"got {tie!r}")
        try:
            return cls(
                vocab_size=integer("vocab_size"),
                hidden_size=integer("hidden_size"),
                intermediate_size=integer("intermediate_size"),
                num_layers=integer("num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=integer("num_key_value_heads", heads),
                head_dim=integer("head_dim", HF_DEFAULT_HEAD_DIM),
                rms_norm_eps=number("rms_norm_eps", 1e-6),
                rope_theta=theta,
                tie_word_embeddings=tie,
                max_position_embeddings=integer("max_position_embeddings",
                                                HF_DEFAULT_MAX_POSITIONS),
                block_size=integer("block_size", DEFAULT_BLOCK_SIZE),
                mask_token_id=integer("mask_token_id", mask_default),
                eos_token_ids=eos_ids,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self, *, orthrus: bool = True, dtype: str = "bfloat16",
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The HF config.json for this shape; with orthrus=True, the OrthrusLM form.

        base: the source config.json. Its fields that this class does not model (bos/pad ids,
        layer_types, auto_map, transformers_version, ...) are kept, and its RoPE field style
        (rope_parameters or rope_theta) is followed, so a conversion round trip keeps the config.
        """
        base = dict(base or {})
        out: dict[str, Any] = {**base,
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
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": base.get("attention_dropout", 0.0),
            "use_sliding_window": False,
            # the source's own value: ours may come from generation_config.json
            "eos_token_id": base.get("eos_token_id", list(self.eos_token_ids)
                                     if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]),
            "torch_dtype": dtype,
            "dtype": dtype,  # transformers >= 5 reads "dtype", older versions "torch_dtype"
        }
        if isinstance(base.get("rope_parameters"), dict):
            out["rope_parameters"] = {**base["rope_parameters"], "rope_theta": self.rope_theta,
                                      "rope_type": "default"}
            if "rope_theta" in base:
                out["rope_theta"] = self.rope_theta
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None
        if orthrus:
            out["block_size"] = self.block_size
            out["mask_token_id"] = self.mask_token_id
        else:
            for key in ("block_size", "mask_token_id", "auto_map"):
                out.pop(key, None)
        return out


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """RoPE base from rope_scaling / rope_parameters / rope_theta; only the default type runs."""
    theta = hf.get("rope_theta", HF_DEFAULT_ROPE_THETA)
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field {field} must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field {field} has rope_type {rope_type!r}; only the "
                              "default RoPE is supported")
        theta = rope.get("rope_theta", theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: field rope_theta must be a positive number, got {theta!r}")
    return float(theta)


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
    default_mask = (tokenizer_mask_token_id(model_dir)
                    if isinstance(hf, dict) and hf.get("mask_token_id") is None else None)
    cfg = Qwen3Config.from_hf_dict(hf, source=path, default_mask_token_id=default_mask)
    gen_eos = generation_eos_token_ids(model_dir)
    return cfg if gen_eos is None else dataclasses.replace(cfg, eos_token_ids=gen_eos)


def generation_eos_token_ids(model_dir: str) -> tuple[int, ...] | None:
    """EOS ids of MODEL_DIR/generation_config.json, which HF generate stops on (Qwen3 lists
    <|im_end|> and <|endoftext|> there, config.json only one); None without that field."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a valid generation config ({err})") from None
    return None if eos is None else eos_token_ids(eos, path)


def eos_token_ids(eos: Any, source: str) -> tuple[int, ...]:
    """An eos_token_id field (an integer, a list of them, or None) as a tuple of ids."""
    eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_ids):
        raise ConfigError(f"{source}: field eos_token_id must be an integer or a list of "
                          f"integers, got {eos!r}")
    return tuple(eos_ids)
