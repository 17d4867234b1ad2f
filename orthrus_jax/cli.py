"""What every command line of this project uses: an argument parser whose errors take one line,
and run_cli, which turns a user error into one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from orthrus_jax import compilation_cache
from orthrus_jax.config import ConfigError
from orthrus_jax.hf import ConversionError
from orthrus_jax.model import PREFILL_CHUNK

USER_ERRORS = (ConversionError, ConfigError, FileExistsError, FileNotFoundError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors print one line, `PROG: error: MESSAGE` (the
    message names the flag), and exit with code 2; --help is unchanged.

    Every such command line also takes --compilation-cache-dir, and parsing its arguments turns
    on JAX's persistent compilation cache there (orthrus_jax.compilation_cache: on by default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--compilation-cache-dir", default=None, metavar="DIR",
            help="JAX persistent compilation cache: a second run loads what the first compiled "
                 f"(default: ${compilation_cache.ENV}, else "
                 "$XDG_CACHE_HOME/orthrus-jax/jax-cache; 'none' turns it off)")

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        compilation_cache.enable(getattr(ns, "compilation_cache_dir", None))
        return ns, rest

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def run_cli(fn: Callable[[], object]) -> int:
    """Run fn; a user error becomes `error: <message>` on stderr and exit code 2."""
    try:
        fn()
    except USER_ERRORS as err:
        msg = str(err) if not isinstance(err, OSError) or not err.filename else \
            f"{err.filename}: {err.strerror}"
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    return 0


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
               "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def parse_dtype(name: str) -> str:
    """One spelling of dtypes for every CLI: fp32, bf16, fp16 (float32, bfloat16, float16 too);
    returns the numpy name ('bfloat16'). An argparse `type=`: a bad name is a usage error."""
    key = str(name).strip().lower()
    if key not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{name!r} is not a dtype; use fp32, bf16 or fp16 "
                                         "(float32, bfloat16, float16 accepted too)")
    return DTYPE_NAMES[key]


def default_compute_dtype() -> str:
    """bfloat16 on GPU and TPU, float32 on CPU: the default for generation and data generation."""
    import jax

    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def add_parallel_arguments(parser: argparse.ArgumentParser, distributed: bool = True) -> None:
    """vLLM's --tensor-parallel-size and --data-parallel-size (one program over a device mesh),
    and --distributed (multi-host) unless distributed is False."""
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                        help="split attention heads (whole heads) and the MLP over N devices "
                             "(default 1); the model's query heads must divide by N")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                        help="split batch rows over N groups of devices (default 1)")
    if not distributed:
        return
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize() first (coordinator "
                             "from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID "
                             "or the cluster's auto-detection); every host runs the same command")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """--verify chain|tree and --tree-budget N (Orthrus verification: the K-1 top drafts, or a
    draft tree of N nodes)."""
    parser.add_argument("--verify", choices=("chain", "tree"), default="chain",
                        help="orthrus: chain = verify the K-1 top drafts (default); tree = verify "
                             "a draft tree of --tree-budget nodes built from the diffusion view's "
                             "per-position distributions in one AR pass (greedy: same output; "
                             "sampling: exact)")
    parser.add_argument("--tree-budget", type=int, default=None,
                        help="with --verify tree: draft nodes verified per cycle besides the "
                             "anchor (default K-1, the chain's count)")


def check_parallel_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be >= 1")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_prefill_chunk_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--prefill-chunk-size C of every command that prefills (C >= 1, default PREFILL_CHUNK)."""
    parser.add_argument("--prefill-chunk-size", type=_positive_int, default=PREFILL_CHUNK,
                        metavar="C",
                        help="prompt tokens per prefill chunk: prefill memory grows with the "
                             f"chunk, not the prompt{note} (default {PREFILL_CHUNK})")
