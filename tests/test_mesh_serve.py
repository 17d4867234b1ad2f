"""python -m infer.serve over a device mesh: --tensor-parallel-size / --data-parallel-size refused
in one line where the model or the slots do not allow them; a server with tensor 2 (2 fake CPU
devices, AR mode: the cheapest compile) answers a greedy completion with one device's
tokens."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from infer import text
from infer.engine import generate_all
from tests.test_serve import Server


@pytest.mark.parametrize("argv,needle", [
    (["--tensor-parallel-size", "2"],
     "error: --tensor-parallel-size 2: total number of attention heads (3) must be divisible by "
     "tensor parallel size (2)"),
    (["--slots", "3", "--data-parallel-size", "2"],
     "error: --slots 3 must be divisible by --data-parallel-size 2"),
    (["--tensor-parallel-size", "0"], "error: --tensor-parallel-size must be >= 1, got 0"),
    (["--tensor-parallel-size", "1", "--data-parallel-size", "16"],
     "needs 16 devices, 8 available"),
])
def test_serve_refuses_bad_parallel_sizes_in_one_line(micro_model_dir, capsys, argv, needle):
    from infer.serve import main

    assert main(["--model", str(micro_model_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, micro_model_dir):
    """The micro model's tokenizer over a random 2-layer Qwen3 with 4 query / 2 KV heads."""
    from orthrus_jax.checkpoint import write_model_dir
    from orthrus_jax.config import load_config
    from orthrus_jax.params import init_params

    cfg = dataclasses.replace(load_config(str(micro_model_dir)), num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=32, hidden_size=128,
                              intermediate_size=256)
    params = init_params(cfg, jax.random.PRNGKey(7), jnp.float32)
    params = jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim > 1 else x, params)
    out = tmp_path_factory.mktemp("tp") / "tiny"
    write_model_dir(str(out), cfg, params, str(micro_model_dir))
    return out, cfg, params


def test_serve_tensor_2_answers_like_one_device(tiny_model, tmp_path):
    import httpx2 as httpx

    model, cfg, params = tiny_model
    tok = text.load_tokenizer(str(model))
    ids = text.encode(tok, "def fibonacci(n):")
    want = generate_all(params, cfg, [ids], mode="ar", max_new_tokens=8, slots=1)[0].token_ids
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    srv = Server(model, tmp_path / "cache", ["--tensor-parallel-size", "2", "--no-warmup",
                                             "--mode", "ar", "--verify", "chain"],
                 tmp_path / "tp2.log", env=env)
    try:
        srv.wait_ready()
        r = httpx.post(srv.base + "/v1/completions", timeout=300, json={
            "model": "micro", "prompt": ids, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == text.decode(tok, want)
        assert body["usage"]["completion_tokens"] == len(want)
    finally:
        srv.stop()
    assert "tensor 2 x data 1" in open(tmp_path / "tp2.log").read()
