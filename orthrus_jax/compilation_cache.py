"""JAX's persistent compilation cache, on by default for every command line and the server.

A second run of a command loads its compiled programs from disk instead of compiling them again.
The directory is $XDG_CACHE_HOME/orthrus-jax/jax-cache (~/.cache/... without XDG_CACHE_HOME);
the environment variable ORTHRUS_JAX_COMPILATION_CACHE_DIR or the flag --compilation-cache-dir
(which every orthrus_jax.cli.ArgumentParser has) moves it, and `none` or an empty value turns it
off. JAX's own settings apply as usual (e.g. JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS: only
programs that took at least that long to compile, 1 s by default, are written).
"""
from __future__ import annotations

import os
import pathlib

ENV = "ORTHRUS_JAX_COMPILATION_CACHE_DIR"
OFF = ("", "none")


def default_dir() -> str:
    """$XDG_CACHE_HOME/orthrus-jax/jax-cache, or ~/.cache/orthrus-jax/jax-cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(pathlib.Path.home(), ".cache")
    return os.path.join(base, "orthrus-jax", "jax-cache")


def resolve(flag: str | None = None) -> str | None:
    """The cache directory from the flag, else the environment, else the default; None = off."""
    value = flag if flag is not None else os.environ.get(ENV)
    if value is None:
        return default_dir()
    return None if value.strip().lower() in OFF else os.path.expanduser(value)


def enable(flag: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at resolve(flag) (or leave it off); returns the
    directory. Call before the first compilation."""
    import jax

    path = resolve(flag)
    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
