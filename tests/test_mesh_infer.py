"""Generation over a device mesh (--tensor-parallel-size / --data-parallel-size), in the batch
decoder and in the continuous-batching engine, equals one device token for token (fp32, 8 fake
CPU devices); the sharding is the one documented."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infer import decoder, engine
from infer.decoder import generate
from orthrus_jax import sharding as shd
from orthrus_jax.config import ConfigError, Qwen3Config
from orthrus_jax.params import init_params
from orthrus_jax.paths import DEV_PROMPTS

CFG = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=16, block_size=4, mask_token_id=127,
                  eos_token_ids=(), max_position_embeddings=256)
PROMPTS = [[5, 17, 99, 3, 64, 12, 8], [40, 41], [7, 7, 90, 11, 2, 33, 101, 55, 21, 9, 60]]


@pytest.fixture(scope="module")
def tiny_params():
    """Random weights, scaled up so greedy continuations vary (not one repeated token)."""
    params = init_params(CFG, jax.random.PRNGKey(3), jnp.float32)
    return jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim > 1 else x, params)


@pytest.fixture(scope="module")
def tiny_ref(tiny_params):
    return {mode: [r.token_ids for r in generate(tiny_params, CFG, PROMPTS, mode=mode,
                                                 max_new_tokens=12, batch_size=4)]
            for mode in ("orthrus", "ar")}


def test_reference_is_not_degenerate(tiny_ref):
    assert tiny_ref["orthrus"] == tiny_ref["ar"]
    assert all(len(set(r)) >= 4 for r in tiny_ref["ar"]), tiny_ref["ar"]


@pytest.mark.parametrize("tensor,data", [(2, 1), (4, 1), (2, 2), (8, 1)])
def test_mesh_greedy_equals_one_device(tiny_params, tiny_ref, tensor, data):
    """8 query / 4 KV heads: tensor 2 and 4 split both by whole heads, data 2 x tensor 2 also
    splits rows; tensor 8 splits query heads and replicates the 4 KV heads (as vLLM)."""
    assert jax.device_count() == 8
    mesh = shd.inference_mesh(CFG, tensor, data)
    params = shd.place_params(CFG, tiny_params, mesh)
    layers = params["layers"]
    assert layers["q_proj"].sharding.spec == P(None, None, "tensor")
    assert layers["o_proj_diff"].sharding.spec == P(None, "tensor", None)
    assert layers["gate_proj"].sharding.spec == P(None, None, "tensor")
    kv_split = tensor <= CFG.num_kv_heads
    assert layers["k_proj"].sharding.spec == P(None, None, "tensor" if kv_split else None)
    # whole heads per device: q_proj's columns per device are a multiple of head_dim
    cols = layers["q_proj"].sharding.shard_shape(layers["q_proj"].shape)[-1]
    assert cols == CFG.num_heads // tensor * CFG.head_dim
    modes = ("orthrus", "ar") if (tensor, data) == (2, 2) else ("orthrus",)
    for mode in modes:
        got = generate(params, CFG, PROMPTS, mode=mode, max_new_tokens=12, batch_size=4, mesh=mesh)
        assert [r.token_ids for r in got] == tiny_ref[mode], (tensor, data, mode)


@pytest.mark.parametrize("tensor,data,verify", [(2, 1, "chain"), (4, 1, "chain"), (2, 2, "tree")])
def test_engine_on_mesh_equals_one_device(tiny_params, tiny_ref, tensor, data, verify):
    """The continuous-batching engine over the mesh, 3 requests in 2 slots (a finished slot is
    refilled), gives one device's greedy tokens (chain, or a draft tree of 6 nodes); its slot
    cache is split over slots (data) and KV heads (tensor), whole heads per device."""
    mesh = shd.inference_mesh(CFG, tensor, data)
    eng = engine.Engine(shd.place_params(CFG, tiny_params, mesh), CFG, slots=2, max_len=64,
                        verify=verify, tree_budget=6, mesh=mesh)
    reqs = [eng.submit(engine.Request(p, 12)) for p in PROMPTS]
    while eng.has_work():
        eng.run_once()
    assert [r.tokens for r in reqs] == tiny_ref["orthrus"], (tensor, data, verify)
    k = eng.state.cache.k                       # [layers, slots, positions, kv heads, head_dim]
    assert k.sharding.shard_shape(k.shape) == (CFG.num_layers, 2 // data, 64,
                                               CFG.num_kv_heads // tensor, CFG.head_dim)
    assert eng.state.active.sharding.shard_shape((2,)) == (2 // data,)


def test_engine_slots_must_divide_by_data():
    mesh = shd.inference_mesh(CFG, 1, 2)
    with pytest.raises(engine.GenerationError, match=r"slots \(3\) must be divisible by the data "
                                                     r"parallel size \(2\)"):
        engine.Engine({}, CFG, slots=3, max_len=64, mesh=mesh)


def test_kv_cache_split_over_rows_and_kv_heads(tiny_params):
    mesh = shd.inference_mesh(CFG, 2, 2)
    params = shd.place_params(CFG, tiny_params, mesh)
    spec = decoder.make_spec(CFG, max_new_tokens=8, mesh=mesh)
    batch = decoder._Batch(params, spec, PROMPTS[:2], 8, 4, decoder.Sampling.make(0.0, 1.0),
                           jax.random.PRNGKey(0))
    k = batch.state.cache.k                   # [layers, rows, positions, kv heads, head_dim]
    want = NamedSharding(mesh, P(None, "data", None, "tensor", None))
    assert k.sharding.is_equivalent_to(want, k.ndim), k.sharding
    assert k.sharding.shard_shape(k.shape) == (k.shape[0], 2, k.shape[2], 2, CFG.head_dim)
    assert batch.state.out.sharding.spec[0] == "data"


@pytest.fixture(scope="module")
def micro_prompts(micro_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(micro_model_dir / "tokenizer.json"))
    with open(DEV_PROMPTS) as f:
        texts = [json.loads(line)["prompt"] for line in f][:3]
    return [tok.encode(t, add_special_tokens=False).ids[-48:] for t in texts]


def test_micro_data_parallel_equals_one_device_and_tensor_2_refused(micro_fp32, micro_prompts):
    """The micro model (3 query heads, 1 KV head): data 2 gives one device's tokens; tensor 2 is
    refused, naming both sizes."""
    cfg, params = micro_fp32
    ref = [r.token_ids for r in generate(params, cfg, micro_prompts, max_new_tokens=16,
                                         batch_size=4)]
    mesh = shd.inference_mesh(cfg, 1, 2)
    got = generate(shd.place_params(cfg, params, mesh), cfg, micro_prompts, max_new_tokens=16,
                   batch_size=4, mesh=mesh)
    assert [r.token_ids for r in got] == ref
    with pytest.raises(ConfigError, match=r"attention heads \(3\) must be divisible by tensor "
                                          r"parallel size \(2\)"):
        shd.inference_mesh(cfg, 2, 1)


def test_generate_cli_refuses_tensor_2_on_micro_in_one_line(micro_model_dir, capsys):
    from infer.generate import main

    code = main(["--model", str(micro_model_dir), "--prompt", "def f():",
                 "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "(3)" in err and "(2)" in err and "--tensor-parallel-size" in err


def test_too_many_devices_refused():
    with pytest.raises(ConfigError, match="needs 16 devices, 8 available"):
        shd.inference_mesh(CFG, 8, 2)


def test_make_data_data_parallel_equals_one_device(micro_model_dir, tmp_path):
    """train.make_data with --data-parallel-size 2 writes the documents one device writes."""
    from train import make_data as md

    prompts = tmp_path / "p.jsonl"
    with open(DEV_PROMPTS) as f:
        prompts.write_text("".join(f.readline() for _ in range(3)))
    out = {}
    for data in (1, 2):
        d = md.make_data(str(micro_model_dir), str(prompts), str(tmp_path / f"d{data}"), 8,
                         chunk_size=4, batch_size=4, max_prompt_tokens=48, dtype="float32",
                         data=data)
        out[data] = [np.load(f"{d}/{n}.npy") for n in ("tokens", "mask", "offsets")]
    for a, b in zip(out[1], out[2]):
        np.testing.assert_array_equal(a, b)
    assert out[1][1].sum() >= 3 * 1


@pytest.mark.parametrize("argv,needle", [
    (["--tensor-parallel-size", "2"], "attention heads (3) must be divisible by tensor parallel size (2)"),
    (["--dtype", "fp64"], "argument --dtype: 'fp64' is not a dtype"),
    (["--data-parallel-size", "0"], "argument --data-parallel-size: must be >= 1"),
])
def test_make_data_cli_errors_in_one_line(micro_model_dir, tmp_path, capsys, argv, needle):
    from train import make_data as md

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f():"}) + "\n")
    try:
        code = md.main(["--model", str(micro_model_dir), "--prompts", str(prompts),
                        "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exit_:              # argparse usage errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_dtype_spellings():
    from orthrus_jax.cli import parse_dtype

    for names, want in ((("fp32", "float32", "FP32"), "float32"), (("bf16", "bfloat16"), "bfloat16"),
                        (("fp16", "float16"), "float16")):
        assert {parse_dtype(n) for n in names} == {want}
