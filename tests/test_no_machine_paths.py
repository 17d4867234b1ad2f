"""No tracked text file names a directory of the machine it was written on.

A clone must work anywhere, so code, configs, docs and bench records name repo-relative paths
(or ones the user gives). Checked: the checkout's own absolute path and the directory above it,
the temporary directory, the home directory, and the development machines' test-bed paths.
Left out: third-party text that ships as data (the test bed's prompts, tokenizer vocabularies),
which may quote paths like /tmp/x from the libraries it was cut from, and this file.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import tempfile

from orthrus_jax.paths import REPO_ROOT

THIRD_PARTY_DATA = re.compile(r"^testbed/prompts/.*\.jsonl$|(^|/)tokenizer\.json$")
DEV_MACHINE_PATHS = ("/work/shared", "/work/main", "../shared/")


def machine_dirs() -> list[str]:
    """Absolute directories of this machine that must not appear in tracked files."""
    dirs = [REPO_ROOT, REPO_ROOT.parent, pathlib.Path(tempfile.gettempdir()).resolve(),
            pathlib.Path.home().resolve()]
    return sorted({str(d) for d in dirs if len(d.parts) > 1})  # never "/" itself


def machine_path_pattern() -> re.Pattern[str]:
    """A machine directory followed by a separator or the end of a path-like token."""
    alts = [re.escape(d) + r"(?=[/\s\"'`),;:]|$)" for d in machine_dirs()]
    alts += [re.escape(p) for p in DEV_MACHINE_PATHS]
    return re.compile("|".join(alts), re.MULTILINE)


def tracked_text_files() -> list[pathlib.Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    this = pathlib.Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()
    out = []
    for name in names:
        if not name or name == this or THIRD_PARTY_DATA.search(name):
            continue
        data = (REPO_ROOT / name).read_bytes() if (REPO_ROOT / name).is_file() else b""
        if b"\0" not in data[:8192]:
            out.append(REPO_ROOT / name)
    return out


def find_machine_paths(files: list[pathlib.Path]) -> list[str]:
    pattern = machine_path_pattern()
    hits = []
    for path in files:
        text = path.read_text(errors="replace")
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{path.relative_to(REPO_ROOT)}:{line}: {m.group(0)!r}")
    return hits


def test_no_tracked_file_names_a_machine_path():
    files = tracked_text_files()
    assert len(files) > 50, "git ls-files found too few files: is this a checkout?"
    assert find_machine_paths(files) == []


def test_the_check_catches_each_kind_of_machine_path():
    """The pattern finds the checkout's parent, a temp dir, the home dir and the dev test bed."""
    samples = [f"model_dir: {REPO_ROOT.parent}/shared/models/micro-qwen3\n",
               f'"out_dir": "{tempfile.gettempdir()}/bench"\n',
               f"python run.py --data {pathlib.Path.home()}/data\n",
               "--prompts ../shared/data/prompts-dev.jsonl\n",
               f"cd {REPO_ROOT} && pytest\n"]
    files = []
    for i, text in enumerate(samples):
        f = REPO_ROOT / "tests" / f".machine-path-sample-{i}.txt"
        files.append(f)
    try:
        for f, text in zip(files, samples):
            f.write_text(text)
        assert len(find_machine_paths(files)) == len(samples)
        clean = REPO_ROOT / "tests" / ".machine-path-sample-clean.txt"
        clean.write_text("--model checkpoints/demo --prompts testbed/prompts/prompts-dev.jsonl\n"
                         "a path in prose: the root dir / and /dev/null\n")
        files.append(clean)
        assert find_machine_paths([clean]) == []
    finally:
        for f in files:
            f.unlink(missing_ok=True)
