"""The training config: one dataclass, loaded from YAML with `key=value` overrides."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from typing import Any

import yaml

from orthrus_jax.cli import DTYPE_NAMES
from orthrus_jax.config import ConfigError


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
        """Rows per micro-batch over all processes (global_batch / grad_accum)."""
        return self.global_batch // self.grad_accum

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError(problems[0])


DTYPES = ("float32", "bfloat16", "float16")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_AT_LEAST = {  # integer fields and their smallest allowed value
    "seq_len": 2, "anchors_per_row": 1, "block_size": 2, "global_batch": 1, "grad_accum": 1,
    "max_steps": 0, "schedule_steps": 0, "anchor_chunks": 1, "mesh_data": 1, "mesh_tensor": 1,
    "save_every": 1, "keep_checkpoints": 1, "keep_every": 0, "log_every": 1, "plot_every": 0,
    "export_every": 0}


def _problems(c: TrainConfig) -> list[str]:
    """What is wrong with a typed config, each naming its keys (empty when it is usable)."""
    out = [f"{k}={getattr(c, k)} must be >= {lo}" for k, lo in _AT_LEAST.items()
           if getattr(c, k) < lo]
    if c.mesh_fsdp != -1 and c.mesh_fsdp < 1:
        out.append(f"mesh_fsdp={c.mesh_fsdp} must be >= 1, or -1 for all remaining devices")
    if out:
        return out
    if c.seq_len <= c.block_size:
        out.append(f"seq_len={c.seq_len} must exceed block_size={c.block_size} "
                   "(anchors sit at 1 <= a <= seq_len - block_size)")
    if c.global_batch % c.grad_accum:
        out.append(f"global_batch={c.global_batch} is not a multiple of grad_accum={c.grad_accum}")
    if c.anchors_per_row % c.anchor_chunks:
        out.append(f"anchors_per_row={c.anchors_per_row} is not a multiple of "
                   f"anchor_chunks={c.anchor_chunks}")
    for key in ("compute_dtype", "export_dtype"):
        if getattr(c, key) not in DTYPES:
            out.append(f"{key}={getattr(c, key)!r} is not one of {', '.join(DTYPES)} "
                       "(or fp32, bf16, fp16)")
    if not (c.epochs > 0 or c.max_steps > 0):
        out.append(f"epochs={c.epochs} must be > 0 (or set max_steps)")
    for key, lo, hi in (("warmup_frac", 0.0, 1.0), ("lr_floor", 0.0, 1.0), ("b1", 0.0, 1.0),
                        ("b2", 0.0, 1.0)):
        if not lo <= getattr(c, key) <= hi:
            out.append(f"{key}={getattr(c, key)} must be in [{lo:g}, {hi:g}]")
    for key in ("weight_decay", "clip_norm", "time_limit_s"):
        if not getattr(c, key) >= 0:
            out.append(f"{key}={getattr(c, key)} must be >= 0")
    try:
        minutes = export_minutes(c.export_at_minutes)
    except ValueError:
        minutes = [-1.0]
    if any(not m >= 0 for m in minutes):
        out.append(f"export_at_minutes={c.export_at_minutes!r} must be comma-separated minutes "
                   "(numbers >= 0), e.g. \"25\" or \"25,40\"")
    return out


def export_minutes(text: str) -> list[float]:
    """export_at_minutes ("25,40") as sorted floats."""
    return sorted(float(x) for x in str(text).split(",") if x.strip())


def _coerce(value: Any, typ: str) -> Any:
    """value (a YAML scalar or a --set string) as the field type `typ`; ValueError if it is not one."""
    if isinstance(value, (list, dict, type(None))) or (isinstance(value, bool) and typ != "bool"):
        raise ValueError
    if typ == "bool":
        word = str(value).strip().lower()
        if isinstance(value, bool) or word in _TRUE + _FALSE:
            return value if isinstance(value, bool) else word in _TRUE
        raise ValueError
    if typ == "int":
        try:
            return int(str(value).strip())
        except ValueError:
            number = float(value)            # "1e3", 2.0; 2.7 and "abc" fail
            if not number.is_integer():
                raise
            return int(number)
    if typ == "float":
        return float(value)
    return str(value)


_EXPECTED = {"bool": "true or false (also yes/no, 1/0)", "int": "an integer",
             "float": "a number", "str": "a string"}


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (optional) and `key=value` overrides (later ones win).

    Every value is checked against its field's type and range; a bad one raises ConfigError,
    one line naming the file (or --set) and the key."""
    raw: list[tuple[str, str, Any]] = []   # (where, key, value)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path}: not found")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({' '.join(str(err).split())})")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of key: value, "
                              f"got {type(data).__name__}")
        raw += [(path, str(k), v) for k, v in (data or {}).items()]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        raw.append((f"--set {item}", key.strip(), value.strip()))
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    typed: dict[str, Any] = {}
    for where, key, value in raw:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{where}: unknown config key {key!r}{hint}")
        try:
            typed[key] = _coerce(value, fields[key])
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: {key}: expected {_EXPECTED[fields[key]]}, "
                              f"got {value!r}") from None
    for key in ("compute_dtype", "export_dtype"):   # the one spelling of every CLI: bf16, ...
        if key in typed and str(typed[key]).lower() in DTYPE_NAMES:
            typed[key] = DTYPE_NAMES[str(typed[key]).lower()]
    try:
        return TrainConfig(**typed)
    except ConfigError as err:
        sources = [path] if path else []
        sources += ["--set"] if overrides else []
        raise ConfigError(f"{' + '.join(sources) or 'config'}: {err}") from None


def add_set_argument(ap: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE ...: config overrides; repeatable (--set a=1 --set b=2 = --set a=1 b=2)."""
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides (any TrainConfig key); may be repeated, later wins")
