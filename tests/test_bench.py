"""Smoke tests of the bench entry points: tiny settings, outputs written to a tmp dir.

No timing assertions: only that the scripts run, greedy outputs match and the files exist.
"""
import json

import pytest


def _files(record):
    return [record["files"][k] for k in sorted(record["files"])]


def test_bench_gpu_tiny(tmp_path):
    from bench import gpu

    rec = gpu.main(["--shape", "tiny", "--prompt-len", "12", "--new-tokens", "8",
                    "--out-dir", str(tmp_path)])
    (shape,) = rec["shapes"]
    assert shape["ar"]["steps"] == 7 and shape["orthrus"]["steps"] >= 1
    assert shape["ar_floor_ms"] > 0 and shape["cycle_over_ar_step"] > 0
    for f in _files(rec):
        assert (tmp_path / f.split("/")[-1]).exists()
    assert json.loads((tmp_path / rec["files"]["json"].split("/")[-1]).read_text())["shapes"]


def test_bench_gpu_refuses_real_shapes_without_gpu(tmp_path, capsys):
    import jax

    from bench import gpu

    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as err:
        gpu.main(["--shape", "qwen3-1.7b", "--out-dir", str(tmp_path)])
    assert err.value.code == 2
    assert "no GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_decode_smoke(tmp_path, micro_model_dir):
    from bench import decode

    prompts = micro_model_dir.parents[1] / "data" / "prompts-dev.jsonl"
    rec = decode.main(["--model", str(micro_model_dir), "--hf-dir", str(micro_model_dir),
                       "--prompts", str(prompts), "--num-prompts", "2",
                       "--max-new-tokens", "8", "--max-prompt-tokens", "16", "--block-size", "8",
                       "--batch-sizes", "1", "--out-dir", str(tmp_path)])
    assert rec["all_outputs_match"] is True
    assert {(r["engine"], r["batch_size"]) for r in rec["runs"]} == {
        ("hf", 1), ("ar", 1), ("orthrus", 1)}
    assert all(r["tokens"] > 0 for r in rec["runs"])
    assert [t["status"] for t in rec["targets"]][2] == "SKIP"  # batch 8 not run
    for f in _files(rec):
        assert (tmp_path / f.split("/")[-1]).exists()
    md = (tmp_path / rec["files"]["markdown"].split("/")[-1]).read_text()
    assert "python -m" in md and rec["date"] in md
