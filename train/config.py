"""The training config: one dataclass, loaded from YAML with `key=value` overrides."""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model and data
    model_dir: str = ""                 # HF dir or Orthrus model dir (backbone + initial heads)
    data_dir: str = ""                  # output of python -m train.make_data
    out_dir: str = "runs/default"       # checkpoints, metrics.jsonl, plot, exported model dir
    # packing and anchors
    seq_len: int = 2048                 # L: packed row length
    anchors_per_row: int = 256          # B: anchor blocks per row
    block_size: int = 32                # K
    # batch and schedule
    global_batch: int = 128             # rows per optimizer step (= micro_batch * grad_accum)
    grad_accum: int = 16                # micro-batches per optimizer step
    epochs: float = 2.0
    max_steps: int = 0                  # > 0: stop after this many steps (overrides epochs)
    schedule_steps: int = 0             # > 0: length of the cosine schedule (else total steps)
    learning_rate: float = 2e-4
    warmup_frac: float = 0.05
    lr_floor: float = 0.1               # final LR as a fraction of peak
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    # precision and memory
    compute_dtype: str = "bfloat16"     # frozen weights and activations; trainable master is fp32
    remat: bool = True                  # per-layer rematerialisation in both passes
    anchor_chunks: int = 1              # diffusion pass + KL over this many groups of blocks
    # sharding
    mesh_data: int = 1
    mesh_fsdp: int = -1                 # -1: all remaining devices
    mesh_tensor: int = 1
    distributed: bool = False           # call jax.distributed.initialize() (multi-host)
    # bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 3
    keep_every: int = 0                 # > 0: also keep checkpoints at multiples of this step
    log_every: int = 1
    plot_every: int = 50
    export_every: int = 0               # > 0: also export a full model dir every N steps
    export_at_end: bool = True
    export_dtype: str = "bfloat16"      # dtype of exported model dirs
    export_at_minutes: str = ""         # e.g. "25": export model-25min after 25 min of training
    time_limit_s: float = 0.0           # > 0: stop (save + export) after this much training time
    schedule_by_time: bool = False      # with time_limit_s: the cosine follows elapsed time

    @property
    def micro_batch(self) -> int:
        assert self.global_batch % self.grad_accum == 0, "global_batch must divide by grad_accum"
        return self.global_batch // self.grad_accum


def _coerce(value: str, typ: Any) -> Any:
    if typ in (bool, "bool"):
        return str(value).lower() in ("1", "true", "yes", "on")
    if typ in (int, "int"):
        return int(float(value))
    if typ in (float, "float"):
        return float(value)
    return value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (optional) and `key=value` overrides."""
    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            values.update(yaml.safe_load(f) or {})
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        values[key.strip()] = value.strip()
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    typed = {k: _coerce(v, fields[k]) if isinstance(v, str) and fields[k] != "str" else v
             for k, v in values.items()}
    return TrainConfig(**typed)
