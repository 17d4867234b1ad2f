"""The argument parser every command line of this project uses: errors take one line."""
from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors print one line, `PROG: error: MESSAGE` (the
    message names the flag), and exit with code 2; --help is unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")
