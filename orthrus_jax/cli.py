"""What every command line of this project uses: an argument parser whose errors take one line,
and run_cli, which turns a user error into one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from orthrus_jax.config import ConfigError
from orthrus_jax.hf import ConversionError

USER_ERRORS = (ConversionError, ConfigError, FileExistsError, FileNotFoundError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors print one line, `PROG: error: MESSAGE` (the
    message names the flag), and exit with code 2; --help is unchanged."""

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
