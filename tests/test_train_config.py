"""The training config: every field checked by its type and range, one-line errors naming the
file or --set and the key; train.run / memcheck / eval_accept print them as `error: ...`, exit 2."""
from __future__ import annotations

import jax
import pytest

from orthrus_jax.checkpoint import write_model_dir
from orthrus_jax.config import ConfigError
from orthrus_jax.params import init_params
from tests.conftest import REPO
from train.config import TrainConfig, load_config

QWEN3_8B = str(REPO / "train" / "configs" / "qwen3-8b.yaml")


@pytest.mark.parametrize("item,message", [
    ("remat=ture", "--set remat=ture: remat: expected true or false"),
    ("remat=maybe", "remat: expected true or false"),
    ("seq_len=2.7", "--set seq_len=2.7: seq_len: expected an integer, got '2.7'"),
    ("seq_len=abc", "seq_len: expected an integer, got 'abc'"),
    ("learning_rate=fast", "learning_rate: expected a number"),
    ("compute_dtype=float33", "compute_dtype='float33' is not one of float32, bfloat16, float16"),
    ("export_dtype=int8", "export_dtype='int8' is not one of"),
    ("mesh_tensor=0", "mesh_tensor=0 must be >= 1"),
    ("mesh_data=-1", "mesh_data=-1 must be >= 1"),
    ("mesh_fsdp=0", "mesh_fsdp=0 must be >= 1, or -1"),
    ("anchor_chunks=3", "anchors_per_row=256 is not a multiple of anchor_chunks=3"),
    ("grad_accum=3", "global_batch=128 is not a multiple of grad_accum=3"),
    ("block_size=1", "block_size=1 must be >= 2"),
    ("seq_len=32", "seq_len=32 must exceed block_size=32"),
    ("save_every=0", "save_every=0 must be >= 1"),
    ("warmup_frac=1.5", "warmup_frac=1.5 must be in [0, 1]"),
    ("export_at_minutes=soon", "export_at_minutes='soon' must be comma-separated minutes"),
    ("seq_lenn=64", "unknown config key 'seq_lenn' (did you mean seq_len?)"),
    ("remat", "--set 'remat': expected key=value"),
])
def test_bad_override_is_one_line_naming_key(item, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("body,message", [
    ("remat: maybe\n", "remat: expected true or false (also yes/no, 1/0), got 'maybe'"),
    ("seq_len: [1, 2]\n", "seq_len: expected an integer, got [1, 2]"),
    ("seq_len: 2.5\n", "seq_len: expected an integer, got 2.5"),
    ("global_batch: true\n", "global_batch: expected an integer, got True"),
    ("data_dir:\n", "data_dir: expected a string, got None"),
    ("- seq_len\n", "expected a mapping"),
    ("seq_len: [\n", "not valid YAML"),
])
def test_bad_yaml_names_file_and_key(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_good_values_and_spellings(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("remat: no\nseq_len: 512.0\nexport_at_minutes: 25\nlearning_rate: 2e-4\n")
    cfg = load_config(str(path), ["distributed=yes", "keep_every=1e3", "mesh_fsdp=-1",
                                  "export_at_minutes=10,20"])
    assert (cfg.remat, cfg.seq_len, cfg.learning_rate) == (False, 512, 2e-4)
    assert (cfg.distributed, cfg.keep_every, cfg.mesh_fsdp) == (True, 1000, -1)
    assert cfg.export_at_minutes == "10,20" and load_config(str(path)).export_at_minutes == "25"
    for word, value in (("true", True), ("1", True), ("YES", True), ("False", False), ("0", False)):
        assert load_config(None, [f"remat={word}"]).remat is value
    assert TrainConfig().micro_batch == 8
    for name in ("micro-cpu", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"):
        load_config(str(REPO / "train" / "configs" / f"{name}.yaml"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file /nonexistent.yaml: not found"):
        load_config("/nonexistent.yaml")


def one_line_error(main, argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def test_commands_print_one_line_errors(tmp_path, capsys, micro_model_dir):
    from train import eval_accept, memcheck, run
    assert "config file /nope.yaml: not found" in one_line_error(
        run.main, ["--config", "/nope.yaml"], capsys)
    assert "remat: expected true or false" in one_line_error(
        run.main, ["--set", "remat=ture"], capsys)
    err = one_line_error(run.main, ["--set", f"model_dir={micro_model_dir}",
                                    f"data_dir={tmp_path / 'nodata'}"], capsys)
    assert err == f"error: data_dir {tmp_path / 'nodata'}: directory not found (make it with " \
                  "python -m train.make_data)"
    err = one_line_error(run.main, ["--set", f"model_dir={tmp_path}", "data_dir=x"], capsys)
    assert f"model_dir {tmp_path}: no config.json in it" in err
    assert "seq_len: expected an integer" in one_line_error(
        memcheck.main, ["--config", QWEN3_8B, "--set", "seq_len=2.7"], capsys)
    assert "--shape nope: not one of" in one_line_error(
        memcheck.main, ["--config", QWEN3_8B, "--shape", "nope"], capsys)
    assert str(tmp_path / "nomodel") in one_line_error(
        eval_accept.main, ["--model", str(tmp_path / "nomodel")], capsys)


def test_micro_batch_not_split_is_refused_by_train_run(tmp_path, capsys):
    """A 4-row micro-batch over 8 devices would be replicated: refused before any work."""
    from tests.test_train import TINY, write_docs
    from train import run
    write_model_dir(str(tmp_path / "m"), TINY, init_params(TINY, jax.random.PRNGKey(0)),
                    str(tmp_path))
    err = one_line_error(run.main, ["--set", f"model_dir={tmp_path / 'm'}",
                                    f"data_dir={write_docs(tmp_path / 'd')}",
                                    f"out_dir={tmp_path / 'o'}", "global_batch=8", "grad_accum=2",
                                    "mesh_fsdp=-1"], capsys)
    assert "global_batch/grad_accum = 8/2 = 4 rows is not a multiple of the mesh's data x fsdp " \
           "= 1 x 8 = 8 devices" in err
