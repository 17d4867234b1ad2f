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

from orthrus_jax.paths import DEV_PROMPTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bench.train --shape on a tiny shape: 1 row of 64 tokens, 4 anchors of K 8, fp32, one device
TRAIN_TINY = ["--shape", "tiny", "--warmup", "1", "--steps", "2", "--set", "seq_len=64",
              "anchors_per_row=4", "block_size=8", "global_batch=1", "grad_accum=1",
              "compute_dtype=float32", "remat=false", "mesh_fsdp=1"]


def _files(record):
    return [record["files"][k] for k in sorted(record["files"])]


def _load(tmp_path, record, kind):
    return (tmp_path / os.path.basename(record["files"][kind])).read_text()


def _tiny_other_prompts():
    """(params, cfg, prompts) of bench.gpu's tiny shape with prompts other than its own."""
    import jax

    from orthrus_jax.params import init_params
    from orthrus_jax.shapes import shape_config

    cfg = shape_config("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0), jax.numpy.float32)
    return params, cfg, [[3] * 12]


def test_bench_gpu_tiny(tmp_path):
    from bench import gpu

    rec = gpu.main(["--shape", "tiny", "--prompt-len", "12", "--new-tokens", "8", "--repeats", "2",
                    "--layers", "stacked,unstacked", "--out-dir", str(tmp_path)])
    shape, unstacked = rec["shapes"]
    assert (shape["layer_layout"], unstacked["layer_layout"]) == ("stacked", "unstacked")
    for mode in ("ar", "orthrus"):  # the same weights and greedy prompts: the same tokens
        assert unstacked[mode]["token_ids_sha256"] == shape[mode]["token_ids_sha256"]
    params, cfg, prompts = _tiny_other_prompts()  # the digest follows the tokens
    other = gpu.time_mode(params, cfg, "ar", prompts, 8, 4, 1)["token_ids_sha256"]
    assert other != shape["ar"]["token_ids_sha256"]
    assert shape["ar"]["steps"] == 7 and shape["orthrus"]["steps"] >= 1
    assert shape["ar_floor_ms"] > 0 and shape["cycle_over_ar_step"] > 0
    for mode in ("ar", "orthrus"):
        t = shape[mode]
        assert t["repeats"] == 2 and len(t["samples"]) == 2
        assert t["ms_per_step"] == min(s["ms_per_step"] for s in t["samples"])
        assert t["ms_per_step_median"] >= t["ms_per_step"]
    assert set(shape["projected_speedup"]) == {str(al) for al in gpu.PROJECTED_AL}
    assert "method" in rec["bandwidth"] and "a * 1.0001" in rec["bandwidth"]["method"]
    m = rec["machine"]
    assert m["device_kind"] and m["jax"] and m["jaxlib"]
    assert sorted(rec["files"]) == ["json", "markdown", "png"]
    for f in _files(rec):
        assert (tmp_path / os.path.basename(f)).exists()
    assert json.loads(_load(tmp_path, rec, "json"))["shapes"]
    md = _load(tmp_path, rec, "markdown")
    for al in (3.84, 6.9, 11.7):  # the table is not only the optimistic case
        assert f"AL {al:g}" in md
    assert "| tiny | unstacked |" in md


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
    for bad in ("unstacked,stacked", "flat", ""):
        with pytest.raises(SystemExit):
            gpu.main(["--shape", "tiny", "--layers", bad, "--out-dir", str(tmp_path)])
        assert "--layers" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_decode_smoke(tmp_path, micro_model_dir):
    from bench import decode

    rec = decode.main(["--model", str(micro_model_dir), "--hf-dir", str(micro_model_dir),
                       "--prompts", str(DEV_PROMPTS), "--num-prompts", "2",
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


def test_bench_decode_context_lengths_smoke(tmp_path, micro_model_dir):
    """--context-lengths: per length, HF's prefill, our TTFT (generate with max_new_tokens=1,
    timed from outside) and ours (AR, Orthrus) timed in turns, every round's seconds recorded;
    Orthrus == AR; no target below 3,000 tokens. 200 > --prefill-chunk-size 128: chunked."""
    from bench import decode

    rec = decode.main(["--model", str(micro_model_dir), "--hf-dir", str(micro_model_dir),
                       "--prompts", str(DEV_PROMPTS), "--context-lengths", "64,200",
                       "--max-new-tokens", "4", "--block-size", "8", "--repeats", "2",
                       "--prefill-chunk-size", "128", "--torch-threads", "1",
                       "--out-dir", str(tmp_path)])
    assert [r["context"] for r in rec["rows"]] == [64, 200]
    assert rec["hf_device"] == "cpu" and rec["args"]["hf_device"] == "cpu"
    for r in rec["rows"]:
        samples = r["samples_s"]
        assert sorted(samples) == ["ar", "hf", "hf_all", "orthrus", "ttft"]
        assert all(len(v) == 2 and min(v) > 0 for v in samples.values())
        assert r["ttft_s"] == min(samples["ttft"]) > 0
        assert r["hf_prefill_s"] == min(samples["hf"]) > 0
        assert r["hf_forward_all_logits_s"] == min(samples["hf_all"]) > 0
        assert r["ttft_over_hf_prefill"] == r["ttft_s"] / r["hf_prefill_s"]
        assert r["ar"]["tokens"] == 4 and r["ar"]["generate_internal_ttft_s"] > 0
        assert r["ar"]["decode_tokens_per_s"] > 0 and r["orthrus"]["decode_tokens_per_s"] > 0
        assert r["orthrus_equals_ar"] is True
    assert rec["targets"] == []  # no context >= 3,000
    for f in _files(rec):
        assert (tmp_path / os.path.basename(f)).exists()
    md = _load(tmp_path, rec, "markdown")
    assert "on cpu" in md and "max_new_tokens=1" in md
    assert ("On this CPU" in md) == (rec["machine"]["backend"] == "cpu")


def test_timed_interleaved_warms_up_then_rotates(monkeypatch):
    """Every fn warmed up once (untimed), then one timed call each per round, round r starting
    at fn r mod n; per name its outputs and seconds, one per round."""
    from bench import common, decode_context

    calls, timed = [], []

    def fake(name):
        def fn():
            calls.append(name)
            return f"{name}{len([c for c in calls if c == name])}"
        return fn

    def fake_timed(fn):
        out = fn()
        timed.append(calls[-1])
        return out, float(len(timed))

    monkeypatch.setattr(common, "timed", fake_timed)
    out = decode_context.timed_interleaved({n: fake(n) for n in "abc"}, repeats=4)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up, untimed
    assert timed == calls[3:] == list("abc" "bca" "cab" "abc")
    assert out["a"] == (["a2", "a3", "a4", "a5"], [1.0, 6.0, 8.0, 10.0])
    assert out["b"] == (["b2", "b3", "b4", "b5"], [2.0, 4.0, 9.0, 11.0])
    assert out["c"] == (["c2", "c3", "c4", "c5"], [3.0, 5.0, 7.0, 12.0])
    calls.clear()
    assert decode_context.timed_interleaved({"d": fake("d")}, repeats=0) == {"d": (["d2"], [13.0])}


def test_bench_decode_bad_hf_device(tmp_path, capsys):
    """A device string torch cannot use: one line naming --hf-device, exit 2, no files."""
    from bench import decode

    with pytest.raises(SystemExit) as err:
        decode.main(["--hf-device", "nodevice", "--out-dir", str(tmp_path)])
    assert err.value.code == 2
    err_text = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--hf-device 'nodevice'" in err_text
    assert not list(tmp_path.iterdir())


def test_bench_decode_tree_verify(tmp_path, micro_model_dir):
    """--verify tree: Orthrus with a 12-node tree matches our AR token for token."""
    from bench import decode

    rec = decode.main(["--model", str(micro_model_dir), "--prompts", str(DEV_PROMPTS),
                       "--num-prompts", "2", "--max-new-tokens", "12", "--max-prompt-tokens", "16",
                       "--block-size", "8", "--batch-sizes", "2", "--engines", "ar,orthrus",
                       "--verify", "tree", "--tree-budget", "12", "--out-dir", str(tmp_path)])
    assert rec["all_outputs_match"] is True
    orth = next(r for r in rec["runs"] if r["engine"] == "orthrus")
    assert orth["nodes_per_cycle"] == 12.0
    assert "Orthrus verification: tree (budget 12 nodes)" in _load(tmp_path, rec, "markdown")


def test_bench_tree_smoke(tmp_path, micro_model_dir):
    from bench import tree

    rec = tree.main(["--model", str(micro_model_dir), "--prompts", str(DEV_PROMPTS),
                     "--num-prompts", "2", "--max-new-tokens", "12", "--max-prompt-tokens", "16",
                     "--block-size", "8", "--batch-size", "2", "--budgets", "4,12",
                     "--out-dir", str(tmp_path)])
    runs = {(r["setting"], r["label"]): r for r in rec["runs"]}
    assert set(runs) == {(s, c) for s in ("greedy", "sampled")
                         for c in ("chain (7)", "tree@4", "tree@12")}
    assert runs[("greedy", "tree@12")]["matches_chain"] == "2/2"
    assert runs[("greedy", "tree@4")]["nodes_per_cycle"] <= 4
    assert rec["targets"][0]["status"] == "SKIP"  # budget 32 not run
    assert sorted(rec["files"]) == ["json", "markdown", "png"]
    md = _load(tmp_path, rec, "markdown")
    assert "python -m bench.tree" in md and "tree@12" in md


def test_bench_tree_bad_budgets(tmp_path, capsys):
    from bench import tree

    with pytest.raises(SystemExit) as err:
        tree.main(["--budgets", "8,x", "--out-dir", str(tmp_path)])
    assert err.value.code == 2 and "--budgets '8,x'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_decode_refuses_fewer_prompts_than_batch(tmp_path, capsys):
    from bench import decode

    with pytest.raises(SystemExit) as err:
        decode.main(["--num-prompts", "2", "--batch-sizes", "1,4", "--out-dir", str(tmp_path)])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1
    assert "--num-prompts 2" in msg and "--batch-sizes 1,4" in msg
    assert not list(tmp_path.iterdir())


def test_bench_train_tiny_smoke(tmp_path):
    from bench import train

    argv = [*TRAIN_TINY, "--out-dir", str(tmp_path)]
    rec = train.main(argv)
    assert rec["timing"]["steps"] == 2 and len(rec["timing"]["step_s"]) == 2
    assert rec["timing"]["tokens_per_s"] > 0 and np.isfinite(rec["timing"]["last_loss"])
    assert rec["mfu"] is None and "CPU" in rec["peak_source"]
    assert sorted(rec["files"]) == ["json", "markdown", "png"]
    for f in _files(rec):
        assert (tmp_path / os.path.basename(f)).exists()
    command = "python -m bench.train " + " ".join(argv)
    assert json.loads(_load(tmp_path, rec, "json"))["command"] == command
    assert f"`{command}`" in _load(tmp_path, rec, "markdown")


def test_bench_train_shape_path_needs_no_grain(tmp_path):
    """--shape imports nothing from grain, orbax or the data pipeline (absent on a bare GPU
    machine); with matplotlib absent too, the PNG is skipped and the run still succeeds."""
    blocked = ["grain", "orbax", "tqdm", "torch", "transformers", "tokenizers", "matplotlib"]
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError("blocked: " + name, name=name)
        sys.meta_path.insert(0, Block())
        from bench import train
        rec = train.main(sys.argv[1:])
        assert "train.data" not in sys.modules, "train.data imported"
        print("FILES", sorted(rec["files"]), rec.get("png_skipped"))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    got = subprocess.run([sys.executable, "-c", code, *TRAIN_TINY, "--steps", "1",
                          "--out-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "FILES ['json', 'markdown'] matplotlib is not installed" in got.stdout


def test_bench_train_without_data_is_one_line(tmp_path, capsys):
    from bench import train

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_dir: /nowhere/model\ndata_dir: {tmp_path / 'micro-sd'}\n")
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(cfg), "--out-dir", str(tmp_path / "out")])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1
    assert str(tmp_path / "micro-sd") in msg and "python -m train.make_data" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),     # SXM
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "bfloat16", 835e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA GH200 480GB", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),      # not "a10"
    ("NVIDIA A10", "bfloat16", 125e12),
    ("NVIDIA A10G", "bfloat16", None),                  # not "a10"
    ("NVIDIA L40", "bfloat16", 181e12),                 # not "l4"
    ("NVIDIA L40S", "float16", 362e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("NVIDIA H100 80GB HBM3", "float32", None),         # no fp32 peak: TF32 or not
    ("Some Future GPU", "bfloat16", None),
])
def test_peak_flops_lookup(kind, dtype, peak):
    from bench.common import peak_flops

    got, why = peak_flops(kind, dtype)
    assert got == peak
    if peak is None:
        assert why and (dtype in why or repr(kind) in why)


def test_peak_flops_cpu_and_mfu():
    from bench.common import peak_flops
    from bench.train import mfu

    assert peak_flops("cpu", "bfloat16", "cpu") == (None, "no accelerator peak (CPU)")
    m = {"backend": "gpu", "device_kind": "NVIDIA H100 PCIe", "device_count": 8}
    r = mfu(756e12, m, "bfloat16", 2)  # the mesh's 2 devices, not all 8
    assert r["peak_flops"] == 2 * 756e12 and r["mfu"] == pytest.approx(0.5)
    assert "h100 pcie" in r["peak_source"]
    r = mfu(756e12, m, "float32", 2)
    assert r["mfu"] is None and r["peak_flops"] is None and "float32" in r["peak_source"]


def test_train_sweep_collect_only(tmp_path, capsys):
    """bench.train_sweep --collect-only: a record (json, md, png) from finished runs; bad --only
    is one line."""
    from bench import train_sweep

    stats = {"acceptance_length": 1.25, "tpf": 1.12, "position_acceptance": [0.9, 0.3, 0.05]}
    for name in ("base", "a24"):
        run_dir = tmp_path / "work" / "runs" / f"{name}-10"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "step_s": 0.5 + i / 100, "loss": 3.0, "accept_len": 1.2}) + "\n"
            for i in range(1, 11)))
        (tmp_path / "work" / f"eval-{name}-10.json").write_text(
            json.dumps({"greedy": stats, "sampled": stats}))
    record = train_sweep.main(["--collect-only", "--work-dir", str(tmp_path / "work"), "--steps",
                               "10", "--out-dir", str(tmp_path / "out")])
    assert [r["name"] for r in record["runs"]] == ["base", "a24"]
    assert all(os.path.exists(p) for p in record["files"].values()) and "png" in record["files"]
    assert "| a24 | 24 anchors per row |" in open(record["files"]["markdown"]).read()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_sweep.main(["--collect-only", "--only", "nope", "--work-dir", str(tmp_path)])
    assert capsys.readouterr().err.strip().endswith("--only: unknown run 'nope'; choose from "
                                                    f"{list(train_sweep.RUNS)}")


def test_bench_serve_summary_and_bad_flags(tmp_path, capsys):
    """bench.serve's per-configuration figures from request timings (ITL = per request, time per
    further token), and a bad --concurrency is one line, exit 2 (no server started)."""
    from bench import serve

    res = [{"ttft": 0.1, "chunk_times": [1.0, 1.5, 2.0], "tokens": 5, "text": "", "latency": 2},
           {"ttft": 0.3, "chunk_times": [1.0], "tokens": 1, "text": "", "latency": 1}]
    s = serve._summary(res, 2.0, tok=None)
    assert s["output_tokens"] == 6 and s["output_tok_s"] == 3.0 and s["req_s"] == 1.0
    assert s["itl_p50_s"] == pytest.approx(0.25) and s["ttft_p50_s"] == pytest.approx(0.2)
    with pytest.raises(SystemExit) as err:
        serve.main(["--concurrency", "1,x", "--out-dir", str(tmp_path)])
    assert err.value.code == 2
    assert "--concurrency '1,x'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as err:  # a device torch cannot use: refused before any server
        serve.main(["--peer-device", "nodevice", "--out-dir", str(tmp_path)])
    err_text = capsys.readouterr().err.strip()
    assert err.value.code == 2 and len(err_text.splitlines()) == 1
    assert "--peer-device 'nodevice'" in err_text and not list(tmp_path.iterdir())


def _serve_record(backend, args, **extra):
    run = {"server": "ours-ar", "setting": "greedy", "concurrency": 16, "output_tok_s": 10.0,
           "req_s": 1.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "itl_p50_s": 0.01,
           "itl_p99_s": 0.02, "acceptance_length": None}
    return {"date": "2026-12-04T00:00:00+00:00", "command": "python -m bench.serve", "args": args,
            "machine": {"backend": backend, "device_kind": backend, "processor": "x86_64",
                        "cpu_count": 2, "host": "vm", "jax": "0"},
            "runs": [run], "targets": [], **extra}


def test_bench_serve_markdown_names_each_servers_device_and_dtype():
    """The record's markdown says where and in what precision each server ran: --dtype when the
    record has it; in records from before the flag, ours ran in its platform default (bf16 on a
    GPU) while the peer always ran in fp32."""
    from bench import serve

    gpu_old = serve.markdown(_serve_record("gpu", {}, transformers="5.24.0", peer_device="cuda"))
    assert ("ours on jax's gpu backend in bfloat16 (its default there), the peer (transformers "
            "5.24.0) on torch device cuda in float32") in gpu_old
    assert "Ours on gpu: the micro model (4M parameters) is far too small" in gpu_old
    cpu_new = serve.markdown(_serve_record("cpu", {"dtype": "float32"}, transformers="5.24.0",
                                           peer_device="cpu"))
    assert "ours on jax's cpu backend in float32, the peer" in cpu_new
    assert "on torch device cpu in float32" in cpu_new
    assert "On this CPU the micro model is compute-bound" in cpu_new
    no_peer = serve.markdown(_serve_record("gpu", {"dtype": "bfloat16"}))
    assert "ours on jax's gpu backend in bfloat16, no peer in this run" in no_peer
