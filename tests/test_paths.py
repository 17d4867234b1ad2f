"""The shipped files are found from the package (editable install); without them, one line."""
import json

from infer import generate as cli
from orthrus_jax import paths


def test_shipped_files_are_found_from_the_package():
    assert (paths.DEMO_MODEL_DIR / "params" / "leaves.json").is_file()
    assert (paths.MICRO_MODEL_DIR / "model.safetensors").is_file()
    with open(paths.DEV_PROMPTS) as f:
        assert sum(1 for line in f if json.loads(line)["prompt"]) == 200
    with open(paths.TRAIN_PROMPTS) as f:
        assert sum(1 for _ in f) == 8192
    assert paths.shipped(paths.DEMO_MODEL_DIR, "--model").endswith("checkpoints/demo")


def test_missing_demo_is_a_one_line_error_naming_the_flag(tmp_path, monkeypatch, capsys):
    """As in a non-editable install, where no checkpoints/demo lies beside the package."""
    monkeypatch.setattr(paths, "DEMO_MODEL_DIR", tmp_path / "checkpoints" / "demo")
    rc = cli.main(["--prompt", "def f():", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "pass --model explicitly" in err
    assert str(tmp_path / "checkpoints" / "demo") in err
