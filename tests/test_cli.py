"""Every command line: a usage error is one line naming the flag, exit code 2."""
from __future__ import annotations

import runpy
import sys
import warnings

import pytest

COMMANDS = ("convert.hf_to_orbax", "convert.orbax_to_hf", "infer.generate", "train.run",
            "train.make_data", "train.eval_accept", "train.memcheck", "bench.decode",
            "bench.train", "bench.gpu", "bench.convert_memory", "bench.train_sweep")


@pytest.mark.parametrize("module", COMMANDS)
def test_usage_error_is_one_line(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--no-such-flag"])
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"python -m {module}: error: "), err
    assert "--no-such-flag" in err or "required" in err, err  # the flag, or a missing one
