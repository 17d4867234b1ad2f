"""Smoke tests of the bench entry points: tiny settings, outputs written to a tmp dir.

No timing assertions: only that the scripts run, greedy outputs match and the files exist.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bench.train --shape on a tiny shape: 1 row of 64 tokens, 4 anchors of K 8, fp32, one device
TRAIN_TINY = ["--shape", "tiny", "--warmup", "1", "--steps", "2", "--set", "seq_len=64",
              "anchors_per_row=4", "block_size=8", "global_batch=1", "grad_accum=1",
              "compute_dtype=float32", "remat=false", "mesh_fsdp=1"]


def _files(record):
    return [record["files"][k] for k in sorted(record["files"])]


def _load(tmp_path, record, kind):
    return (tmp_path / os.path.basename(record["files"][kind])).read_text()


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
    err_text = capsys.readouterr().err.strip()
    assert "no GPU" in err_text and len(err_text.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_bench_decode_smoke(tmp_path, micro_model_dir):
    from bench import decode

    prompts = micro_model_dir.parents[1] / "data" / "prompts-dev.jsonl"
    rec = decode.main(["--model", str(micro_model_dir), "--hf-dir", str(micro_model_dir),
                       "--prompts", str(prompts), "--num-prompts", "2",
                       "--max-new-tokens", "8", "--max-prompt-tokens", "16", "--block-size", "8",
                       "--batch-sizes", "1", "--torch-threads", "1", "--out-dir", str(tmp_path)])
    assert rec["all_outputs_match"] is True
    assert {(r["engine"], r["batch_size"]) for r in rec["runs"]} == {
        ("hf", 1), ("ar", 1), ("orthrus", 1)}
    assert all(r["tokens"] > 0 for r in rec["runs"])
    assert [t["status"] for t in rec["targets"]][2] == "SKIP"  # batch 8 not run
    assert rec["torch_threads"] == 1 and rec["torch_threads_source"] == "--torch-threads"
    assert len(rec["machine"]["load_avg"]) == 3 and len(rec["load_avg_end"]) == 3
    assert sorted(rec["files"]) == ["json", "markdown", "png"]
    for f in _files(rec):
        assert (tmp_path / os.path.basename(f)).exists()
    md = _load(tmp_path, rec, "markdown")
    assert "python -m" in md and rec["date"] in md
    assert "1 threads, --torch-threads" in md and "at the start" in md and "at the end" in md


def test_bench_decode_refuses_fewer_prompts_than_batch(tmp_path, capsys):
    from bench import decode

    with pytest.raises(SystemExit) as err:
        decode.main(["--num-prompts", "2", "--batch-sizes", "1,4", "--out-dir", str(tmp_path)])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1
    assert "--num-prompts 2" in msg and "--batch-sizes 1,4" in msg
    assert not list(tmp_path.iterdir())


