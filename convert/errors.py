"""One-line CLI errors: bad input exits 2 with a message naming the file or field, no traceback."""
from __future__ import annotations

import sys
from typing import Callable

from convert.hf_params import ConversionError
from orthrus_jax.config import ConfigError

USER_ERRORS = (ConversionError, ConfigError, FileExistsError, FileNotFoundError, PermissionError)


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
