"""Where the files that ship with the repository live: the demo checkpoint and the test bed.

Found relative to this package, so they resolve from any clone and from an editable install
(`pip install -e .`, as setup.sh does). A non-editable install ships neither: `require` then
says in one line to pass --model (or another path flag) explicitly.
"""
from __future__ import annotations

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "checkpoints" / "demo"
TESTBED_DIR = REPO_ROOT / "testbed"
MICRO_MODEL_DIR = TESTBED_DIR / "micro-qwen3"
DEV_PROMPTS = TESTBED_DIR / "prompts" / "prompts-dev.jsonl"
TRAIN_PROMPTS = TESTBED_DIR / "prompts" / "prompts-train.jsonl"


def shipped(path: pathlib.Path, flag: str) -> str:
    """A shipped file or directory as a path string; one line naming `flag` when this install
    has no repository around the package (a non-editable `pip install .` ships neither the demo
    nor the test bed)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the demo checkpoint and test bed ship with a clone of the "
            f"repository (installed editable, as setup.sh does); pass {flag} explicitly")
    return default_path(path)


def default_path(path: pathlib.Path) -> str:
    """A shipped path as a flag default: relative to the working directory when it lies below
    it (so help texts and records show `checkpoints/demo`), else absolute."""
    try:
        return str(path.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(path)
