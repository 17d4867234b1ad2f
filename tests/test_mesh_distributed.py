"""infer.generate and train.make_data with --distributed for real: 2 processes x 2 fake CPU
devices (jax.distributed, gloo), data parallel 4 over both hosts, equal to one device."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import REPO
from tests.test_train_distributed import communicate_all, free_port, process_env


def launch(module: str, argv: list[str], n_proc: int = 2, devices: int = 2,
           timeout: int = 400) -> list[str]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv, "--distributed"], cwd=REPO,
                              env=process_env(pid, n_proc, port, devices),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(n_proc)]
    results = communicate_all(procs, timeout)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in results]


def test_generate_and_make_data_across_two_processes(micro_model_dir, micro_fp32, tmp_path):
    from infer import text
    from infer.decoder import generate
    from orthrus_jax.paths import DEV_PROMPTS

    prompts = tmp_path / "p.jsonl"
    with open(DEV_PROMPTS) as f:
        prompts.write_text("".join(f.readline() for _ in range(3)))
    common = ["--model", str(micro_model_dir), "--max-new-tokens", "12", "--dtype", "fp32",
              "--data-parallel-size", "4"]
    outs = launch("infer.generate", [*common, "--prompts-file", str(prompts), "--json",
                                     "--batch-size", "4", "--mode", "ar"])
    rows = [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]
    assert len(rows) == 3                                     # the first host prints ...
    assert not [line for line in outs[1].splitlines() if line.startswith("{")]   # ... alone
    cfg, params = micro_fp32
    tok = text.load_tokenizer(str(micro_model_dir))
    ids = [text.encode(tok, json.loads(line)["prompt"]) for line in open(prompts)]
    want = [r.token_ids for r in generate(params, cfg, ids, mode="ar", max_new_tokens=12,
                                          batch_size=4)]
    assert [r["token_ids"] for r in rows] == want

    out = tmp_path / "sd"
    launch("train.make_data", [*common,
                               "--prompts", str(prompts), "--out", str(out), "--batch-size", "4",
                               "--max-prompt-tokens", "64"])
    from train import make_data as md
    ref = md.make_data(str(micro_model_dir), str(prompts), str(tmp_path / "ref"), 12,
                       batch_size=4, max_prompt_tokens=64, dtype="float32")
    for name in ("tokens", "mask", "offsets"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), np.load(f"{ref}/{name}.npy"))
