"""HF <-> Orbax conversion: bit-identical round trips, shards, official _diff names, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes  # noqa: F401  (numpy bf16)
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert import hf_to_orbax, orbax_to_hf
from orthrus_jax.hf import read_hf_params
from orthrus_jax.checkpoint import load_model
from orthrus_jax.params import DIFF_KEYS, DIFF_SOURCE, LAYER_KEYS
from tests.conftest import REPO
from tests.hf_fixtures import TINY_SPECS, make_hf_model, random_diff_weights, save_hf_model


def read_all(hf_dir) -> dict[str, np.ndarray]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for name in files:
        with safe_open(os.path.join(hf_dir, name), framework="np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bit_identical(a: np.ndarray, b: np.ndarray, key: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), key


def convert(hf_dir, out, *extra) -> int:
    return hf_to_orbax.main(["--hf-dir", str(hf_dir), "--out", str(out), "--quiet", *extra])


def back(model_dir, out) -> int:
    return orbax_to_hf.main(["--model", str(model_dir), "--out", str(out), "--quiet"])


def test_round_trip_micro_bf16_bit_identical(micro_model_dir, tmp_path):
    """micro (bf16, tied, no _diff) -> Orbax -> HF Orthrus: every tensor bit-identical, bf16."""
    assert convert(micro_model_dir, tmp_path / "jax") == 0
    cfg, params = load_model(str(tmp_path / "jax"))
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(params))
    assert cfg.mask_token_id == 1  # the tokenizer's <|mask|>
    assert back(tmp_path / "jax", tmp_path / "hf") == 0
    src, out = read_all(micro_model_dir), read_all(tmp_path / "hf")
    for key, arr in src.items():
        assert_bit_identical(out[key], arr, key)
    assert "lm_head.weight" not in out  # tied embeddings
    for i in range(cfg.num_layers):  # warm start: twins are copies of the AR attention
        for name in DIFF_KEYS:
            assert_bit_identical(out[f"model.layers.{i}.{LAYER_KEYS[name][0]}"],
                                 src[f"model.layers.{i}.{LAYER_KEYS[DIFF_SOURCE[name]][0]}"], name)
    assert set(out) == set(src) | {f"model.layers.{i}.{LAYER_KEYS[n][0]}"
                                   for i in range(cfg.num_layers) for n in DIFF_KEYS}
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_cfg["architectures"] == ["OrthrusLM"]
    assert hf_cfg["block_size"] == 32 and hf_cfg["mask_token_id"] == 1
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
    src_cfg = json.load(open(micro_model_dir / "config.json"))  # every other field kept as is
    assert {k: hf_cfg.get(k) for k in src_cfg if k != "architectures"} == \
        {k: v for k, v in src_cfg.items() if k != "architectures"}


def test_round_trip_untied_official_diff_names_fp32(tmp_path):
    """Untied fp32 model with official _diff names: loaded (not copied), round trip identical,
    and the output loads in transformers with the same logits."""
    spec = TINY_SPECS[1]
    model = make_hf_model(spec, seed=3)
    diff = random_diff_weights(model, seed=4)
    src_dir = save_hf_model(model, str(tmp_path / "src"), diff=diff)
    assert convert(src_dir, tmp_path / "jax") == 0  # --dtype auto: the checkpoint's fp32
    _, params = load_model(str(tmp_path / "jax"))
    q_diff = diff["model.layers.1.self_attn.q_proj_diff.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["q_proj_diff"][1]), q_diff.T)
    assert back(tmp_path / "jax", tmp_path / "hf") == 0
    src, out = read_all(src_dir), read_all(tmp_path / "hf")
    assert set(out) == set(src) and "lm_head.weight" in out
    for key, arr in src.items():
        assert_bit_identical(out[key], arr, key)
    from transformers import Qwen3ForCausalLM

    reloaded = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.arange(20)[None] % spec.vocab
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,flag,bit_identical", [
    (torch.float16, (), True), (torch.bfloat16, (), True), (torch.float16, ("--dtype", "bf16"), False)])
def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path, dtype, flag, bit_identical):
    """The default --dtype auto keeps fp16 / bf16 checkpoints bit-identical through the round
    trip; an explicit --dtype casts every tensor."""
    model = make_hf_model(TINY_SPECS[0], seed=6, dtype=dtype)
    src_dir = save_hf_model(model, str(tmp_path / "src"))
    assert convert(src_dir, tmp_path / "jax", *flag) == 0
    _, params = load_model(str(tmp_path / "jax"))
    want = jax.numpy.bfloat16 if flag else dtype_name(dtype)
    assert all(x.dtype == want for x in jax.tree_util.tree_leaves(params))
    assert back(tmp_path / "jax", tmp_path / "hf") == 0
    src, out = read_all(src_dir), read_all(tmp_path / "hf")
    same = all(out[k].dtype == a.dtype and out[k].tobytes() == a.tobytes() for k, a in src.items())
    assert same == bit_identical


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


MODELING_STAND_IN = """
import torch
from transformers import Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm


class OrthrusLM(Qwen3ForCausalLM):
    \"\"\"Stand-in for the official src/model.py: the same _diff parameter names.\"\"\"

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                ar = getattr(attn, name)
                setattr(attn, name + "_diff",
                        torch.nn.Linear(ar.in_features, ar.out_features, bias=False))
            attn.q_norm_diff = Qwen3RMSNorm(config.head_dim, eps=config.rms_norm_eps)
            attn.k_norm_diff = Qwen3RMSNorm(config.head_dim, eps=config.rms_norm_eps)
        self.post_init()
"""


def test_export_with_modeling_file_loads_through_remote_code(tmp_path):
    """--modeling-file: AutoModelForCausalLM(trust_remote_code=True) builds OrthrusLM from the
    export with no missing or unexpected weights, and the trained heads arrive intact."""
    from transformers import AutoModelForCausalLM

    model = make_hf_model(TINY_SPECS[1], seed=7)
    diff = random_diff_weights(model, seed=8)
    src_dir = save_hf_model(model, str(tmp_path / "src"), diff=diff)
    assert convert(src_dir, tmp_path / "jax") == 0
    modeling = tmp_path / "model.py"
    modeling.write_text(MODELING_STAND_IN)
    assert orbax_to_hf.main(["--model", str(tmp_path / "jax"), "--out", str(tmp_path / "hf"),
                             "--quiet", "--modeling-file", str(modeling)]) == 0
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_orthrus.OrthrusLM"}
    loaded, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32,
        output_loading_info=True)
    assert type(loaded).__name__ == "OrthrusLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = loaded.state_dict()
    for key, want in diff.items():
        torch.testing.assert_close(state[key], want, rtol=0, atol=0)
    # a re-export of that model dir keeps the auto_map and the modeling file
    assert back(tmp_path / "jax", tmp_path / "hf2") == 0 and "auto_map" not in json.load(
        open(tmp_path / "hf2" / "config.json"))
    assert convert(tmp_path / "hf", tmp_path / "jax2") == 0
    assert back(tmp_path / "jax2", tmp_path / "hf3") == 0
    assert json.load(open(tmp_path / "hf3" / "config.json"))["auto_map"] == hf_cfg["auto_map"]
    assert (tmp_path / "hf3" / "modeling_orthrus.py").read_text() == MODELING_STAND_IN


def test_sharded_input_equals_single_file(tmp_path):
    """An index + several shards converts to the same parameters as one file."""
    spec = TINY_SPECS[2]
    model = make_hf_model(spec, seed=5)
    single = save_hf_model(model, str(tmp_path / "single"))
    sharded = save_hf_model(model, str(tmp_path / "sharded"), max_shard_size="40KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert convert(sharded, tmp_path / "jax", "--dtype", "fp32") == 0
    _, got = load_model(str(tmp_path / "jax"))
    _, want = read_hf_params(single)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    # sharded output (with the _diff twins), and that sharded Orthrus checkpoint read back
    assert orbax_to_hf.main(["--model", str(tmp_path / "jax"), "--out", str(tmp_path / "out"),
                             "--quiet", "--max-shard-gb", str(40e3 / 2**30)]) == 0
    out_shards = [f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]
    assert len(out_shards) >= 2 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    src, out = read_all(single), read_all(tmp_path / "out")
    for key, arr in src.items():
        assert_bit_identical(out[key], arr, key)
    assert any("_diff" in k for k in out)
    assert convert(tmp_path / "out", tmp_path / "jax2") == 0
    _, again = load_model(str(tmp_path / "jax2"))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(again), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


# --- bad input: one line on stderr naming the file / field, exit code 2, nothing left behind.


@pytest.fixture(scope="module")
def good_hf_dir(tmp_path_factory):
    model = make_hf_model(TINY_SPECS[0], seed=9, dtype=torch.bfloat16)
    return save_hf_model(model, str(tmp_path_factory.mktemp("good") / "hf"), max_shard_size="40KB")


def _edit_config(d, **updates):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.update(updates)
    json.dump(cfg, open(path, "w"))


def _first_shard(d):
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    return os.path.join(d, index["weight_map"]["model.embed_tokens.weight"])


def _missing_shard(d):
    os.remove(_first_shard(d))
    return os.path.basename(_first_shard(d))


def _wrong_shape(d):
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    key = "model.layers.1.self_attn.k_proj.weight"
    path = os.path.join(d, index[key])
    tensors = load_file(path)
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    return key


def _truncated(d):
    path = _first_shard(d)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return os.path.basename(path)


def _not_qwen3(d):
    _edit_config(d, model_type="llama")
    return "model_type"


def _unknown_rope(d):
    _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    return "field rope_parameters has rope_type 'yarn'"


BAD_INPUTS = {"missing-shard": _missing_shard, "wrong-shape": _wrong_shape,
              "truncated": _truncated, "not-qwen3": _not_qwen3, "unknown-rope": _unknown_rope}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error_exit_2_nothing_left(case, good_hf_dir, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(good_hf_dir, hf_dir)
    expected = BAD_INPUTS[case](str(hf_dir))
    out = tmp_path / "new" / "out"
    assert convert(hf_dir, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()  # neither the output nor a temp sibling nor its parent


def test_existing_output_refused_untouched(micro_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(micro_model_dir, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "exists" in err
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]
    assert back(out, tmp_path / "hf") == 2  # a directory without config.json / params
    assert "config.json" in capsys.readouterr().err
    assert back(micro_model_dir, out) == 2


def test_cli_subprocess_exit_code_and_help(tmp_path):
    """The real entry points: --help names every flag; bad input exits 2 with no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "convert.hf_to_orbax", "--hf-dir",
                          str(tmp_path / "nope"), "--out", str(tmp_path / "o")], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(tmp_path / "nope") in res.stderr and not (tmp_path / "o").exists()
    for module, flags in (("convert.hf_to_orbax", ("--hf-dir", "--out", "--dtype", "--overwrite")),
                          ("convert.orbax_to_hf", ("--model", "--out", "--max-shard-gb"))):
        res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0 and all(f in res.stdout for f in flags), res.stdout


def test_conversion_prints_parameter_split(micro_model_dir, tmp_path, capsys):
    """Without --quiet the converter ends with the backbone / trainable _diff split."""
    assert hf_to_orbax.main(["--hf-dir", str(micro_model_dir), "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"wrote {tmp_path / 'm'}; parameters: ") and "% trainable)" in err, err


# --- the model directory format: one Orbax item per leaf, streamed both ways.


def test_model_dir_per_leaf_cast_and_stream_checks(micro_model_dir, tmp_path):
    """load_model casts leaf by leaf; the streaming writer refuses a missing or misshapen leaf
    and leaves nothing behind; the older single-tree params/ layout still loads."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from orthrus_jax.checkpoint import (
        LEAF_INDEX, iter_leaves, leaf_shapes, write_model_dir, write_model_dir_streaming,
    )

    assert convert(micro_model_dir, tmp_path / "jax") == 0
    cfg, bf16 = load_model(str(tmp_path / "jax"))
    index = json.load(open(tmp_path / "jax" / "params" / LEAF_INDEX))
    assert set(index["leaves"]) == set(leaf_shapes(cfg)) and index["dtype"] == "bfloat16"
    _, fp32 = load_model(str(tmp_path / "jax"), jnp.float32)
    fp32_leaves = dict(iter_leaves(fp32))
    for name, a in iter_leaves(bf16):
        assert fp32_leaves[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(fp32_leaves[name]),
                                      err_msg=name)
    leaves = list(iter_leaves(bf16))
    with pytest.raises(ValueError, match="missing"):
        write_model_dir_streaming(str(tmp_path / "bad"), cfg, leaves[:-1], str(micro_model_dir))
    with pytest.raises(ValueError, match="shape"):
        write_model_dir_streaming(str(tmp_path / "bad"), cfg, [(leaves[0][0], leaves[1][1])],
                                  str(micro_model_dir))
    assert sorted(os.listdir(tmp_path)) == ["jax"]
    # the older layout: params/ is one StandardCheckpointer tree
    write_model_dir(str(tmp_path / "old"), cfg, bf16, str(micro_model_dir))
    shutil.rmtree(tmp_path / "old" / "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "old" / "params"), bf16)
    _, old = load_model(str(tmp_path / "old"), jnp.float32)
    old_leaves = dict(iter_leaves(old))
    for name, a in fp32_leaves.items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(old_leaves[name]), err_msg=name)


@pytest.mark.parametrize("damage", ["truncated-leaf", "bad-index"])
def test_damaged_model_dir_one_line_error(micro_model_dir, tmp_path, capsys, damage):
    """A truncated leaf or a corrupt leaves.json: orbax_to_hf prints one line naming the file,
    exits 2 and writes nothing."""
    assert convert(micro_model_dir, tmp_path / "jax") == 0
    leaf = tmp_path / "jax" / "params" / "layers.q_proj_diff"
    if damage == "truncated-leaf":
        for f in (p for p in leaf.rglob("*") if p.is_file() and p.parent.name == "d"):
            os.truncate(f, f.stat().st_size // 2)
        named = str(leaf)
    else:
        (tmp_path / "jax" / "params" / "leaves.json").write_text("{bad")
        named = str(tmp_path / "jax" / "params" / "leaves.json")
    capsys.readouterr()
    assert back(tmp_path / "jax", tmp_path / "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {named}"), err
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc VmHWM")
def test_converter_streams_peak_memory_under_one_model(tmp_path):
    """Converting a random ~0.18 GB model raises peak RSS over an import-only process by less
    than the model's bytes (streaming: ~0.4x measured; the whole-tree save was ~2.35x)."""
    from bench.convert_memory import baseline_rss, converter_peak_rss, write_random_model

    model_bytes = write_random_model("test", str(tmp_path / "hf"))
    peak = converter_peak_rss(str(tmp_path / "hf"), str(tmp_path / "out"))
    base = baseline_rss()
    assert os.path.exists(tmp_path / "out" / "params")
    assert peak - base < 1.0 * model_bytes, (peak, base, model_bytes)


_LOAD_IN_ONE_DEVICE_PROCESS = """
import json, sys
import jax, numpy as np
from orthrus_jax.checkpoint import load_model
for d in sys.argv[1:]:
    _, params = load_model(d)
    leaves = jax.tree_util.tree_leaves(params)
    print(json.dumps({"devices": len(jax.devices()),
                      "leaf_devices": sorted({str(dev) for x in leaves for dev in x.devices()}),
                      "sum": sum(float(np.asarray(x, np.float64).sum()) for x in leaves)}))
"""


def test_model_dir_saved_from_another_device_loads_on_the_default_one(micro_model_dir, tmp_path):
    """A checkpoint records the device its leaves were saved from (here cpu:7 of 8); a process
    without that device (here one CPU device; on a GPU machine, a checkpoint written on the CPU)
    restores every leaf onto its own default device, in both params/ layouts."""
    import orbax.checkpoint as ocp

    from orthrus_jax.checkpoint import write_model_dir

    assert str(jax.devices()[-1]) == "cpu:7", "needs conftest's 8 host devices"
    assert convert(micro_model_dir, tmp_path / "jax") == 0
    cfg, params = load_model(str(tmp_path / "jax"))
    on_last = jax.device_put(params, jax.devices()[-1])
    write_model_dir(str(tmp_path / "leaves"), cfg, on_last, str(micro_model_dir))
    write_model_dir(str(tmp_path / "tree"), cfg, on_last, str(micro_model_dir))
    shutil.rmtree(tmp_path / "tree" / "params")
    with ocp.StandardCheckpointer() as ckptr:   # the older single-tree layout
        ckptr.save(str(tmp_path / "tree" / "params"), on_last)
    total = sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree_util.tree_leaves(params))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _LOAD_IN_ONE_DEVICE_PROCESS,
                          str(tmp_path / "leaves"), str(tmp_path / "tree")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(x["devices"], x["leaf_devices"]) for x in loaded] == [(1, ["cpu:0"])] * 2
    assert [x["sum"] for x in loaded] == [pytest.approx(total, rel=1e-12)] * 2
