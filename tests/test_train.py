"""Training: target alignment, data pipeline, step invariants, sharding equivalence, resume, NaN stop,
save/export/log bookkeeping, --set, the micro-batch check."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthrus_jax.checkpoint import write_model_dir
from orthrus_jax.config import Qwen3Config
from orthrus_jax.params import init_params, merge_params, split_params
from train.config import load_config
from train.data import DocSource, PackedRows, make_dataset, sample_anchors
from train.step import LossOptions, block_targets, make_optimizer, make_train_step

K = 4
TINY = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, block_size=K, mask_token_id=1, eos_token_ids=(0,),
                   max_position_embeddings=256)


def write_docs(path, n_docs=40, seed=0):
    """A synthetic make_data output: docs = prompt (mask 0) + response (mask 1)."""
    rng = np.random.default_rng(seed)
    toks, masks, lens = [], [], []
    for _ in range(n_docs):
        p, r = int(rng.integers(3, 12)), int(rng.integers(4, 20))
        toks.append(rng.integers(2, TINY.vocab_size, p + r).astype(np.int32))
        masks.append(np.r_[np.zeros(p, np.uint8), np.ones(r, np.uint8)])
        lens.append(p + r)
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "tokens.npy"), np.concatenate(toks))
    np.save(os.path.join(path, "mask.npy"), np.concatenate(masks))
    np.save(os.path.join(path, "offsets.npy"), np.r_[0, np.cumsum(lens)].astype(np.int64))
    return str(path)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    params = init_params(TINY, jax.random.PRNGKey(0), jnp.float32, copy_diff=True)
    model_dir = str(root / "model")
    write_model_dir(model_dir, TINY, params, str(root))
    return {"model_dir": model_dir, "data_dir": write_docs(root / "data"), "root": root}


def tiny_cfg(setup, out, **kw):
    base = dict(model_dir=setup["model_dir"], data_dir=setup["data_dir"], out_dir=str(out),
                seq_len=32, anchors_per_row=4, block_size=K, global_batch=4, grad_accum=2,
                max_steps=4, learning_rate=1e-2, compute_dtype="float32", remat=True,
                anchor_chunks=2, mesh_fsdp=1, save_every=2, plot_every=0, export_at_end=False)
    base.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def losses(out_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(out_dir, "metrics.jsonl"))]


# ------------------------------------------------------------------ target alignment


def test_block_targets_alignment():
    seq_len = 16
    tokens = jnp.arange(100, 100 + seq_len, dtype=jnp.int32)[None]       # x_p = 100 + p
    mask = jnp.ones((1, seq_len), bool).at[0, 7].set(False)
    anchors = jnp.array([[2, 5, 12]], jnp.int32)
    valid_anchor = jnp.array([[True, True, False]])
    t = block_targets(tokens, mask, anchors, valid_anchor, K)
    a = np.array([2, 5, 12])[:, None]
    i = np.arange(K)[None]
    np.testing.assert_array_equal(t["positions"][0], a + i)
    np.testing.assert_array_equal(t["teacher_pos"][0], a + i)     # teacher: AR distribution at a+i
    np.testing.assert_array_equal(t["target_pos"][0][:, : K - 1], (a + i + 1)[:, : K - 1])  # x_{a+i+1}
    v = np.asarray(t["valid"][0])
    assert not v[:, K - 1].any()                                  # last block position: no target
    assert v[0, : K - 1].all()                                    # targets 3, 4, 5: responses
    assert v[1].tolist() == [True, False, True, False]            # target 7 is context
    assert not v[2].any()                                         # invalid anchor slot


def _targets_by_loops(tokens, mask, anchors, anchor_valid, k):
    """block_targets written out per element from the rule (block position i of anchor a: teacher
    = AR position a+i, target = x_{a+i+1}; supervised iff i < K-1, a valid anchor, a+i+1 inside
    the row and a response token)."""
    rows, seq_len = tokens.shape
    out = {n: np.zeros((*anchors.shape, k), np.int64) for n in ("teacher", "target_tok")}
    out["valid"] = np.zeros((*anchors.shape, k), bool)
    for r in range(rows):
        for b, a in enumerate(anchors[r]):
            for i in range(k):
                out["teacher"][r, b, i] = a + i
                nxt = a + i + 1
                if nxt < seq_len:
                    out["target_tok"][r, b, i] = tokens[r, nxt]
                out["valid"][r, b, i] = (i < k - 1 and anchor_valid[r, b] and nxt < seq_len
                                         and bool(mask[r, nxt]))
    return out


def test_block_targets_predict_next_token_of_teacher():
    """Block position i of anchor a is supervised by the AR distribution at a+i towards the token
    x_{a+i+1}, checked element by element against the rule written as loops, on random rows,
    masks and anchors, including anchors whose block runs past the row end (target_pos clamped
    to the last position, those positions unsupervised)."""
    rng = np.random.default_rng(0)
    seq_len, k = 16, 6
    tokens = rng.integers(2, 1000, (3, seq_len)).astype(np.int32)
    mask = rng.random((3, seq_len)) < 0.7
    anchors = np.array([[1, 4, seq_len - k], [2, seq_len - 3, seq_len - 1], [0, 7, 9]], np.int32)
    valid_anchor = np.array([[True, True, True], [True, True, True], [True, False, True]])
    t = jax.tree_util.tree_map(np.asarray, block_targets(
        jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(anchors), jnp.asarray(valid_anchor), k))
    ref = _targets_by_loops(tokens, mask, anchors, valid_anchor, k)
    np.testing.assert_array_equal(t["positions"], ref["teacher"])
    np.testing.assert_array_equal(t["teacher_pos"][ref["valid"]], ref["teacher"][ref["valid"]])
    np.testing.assert_array_equal(t["valid"], ref["valid"])
    got_tok = np.take_along_axis(tokens, t["target_pos"].reshape(3, -1), 1).reshape(t["valid"].shape)
    np.testing.assert_array_equal(got_tok[ref["valid"]], ref["target_tok"][ref["valid"]])
    clamped = t["positions"] + 1 > seq_len - 1
    assert clamped.sum() >= 5                                 # the clamp is reached ...
    assert (t["target_pos"][clamped] == seq_len - 1).all()    # ... stays inside the row ...
    assert t["teacher_pos"].max() == seq_len - 1
    assert not t["valid"][clamped].any()                      # ... and is never supervised
    assert ref["valid"].sum() >= 10 and (~ref["valid"]).sum() >= 10


# ------------------------------------------------------------------ data


def test_packing_anchors_and_iterator_state(tiny_setup):
    docs = DocSource(tiny_setup["data_dir"])
    rows = PackedRows(docs, 32, seed=3, epochs=2)
    order, _ = rows._epoch(0)
    stream = np.concatenate([docs[int(j)]["tokens"] for j in order])
    got = np.concatenate([rows[i]["tokens"] for i in range(rows.rows_per_epoch)])
    np.testing.assert_array_equal(got, stream[: len(got)])
    assert not np.array_equal(rows[0]["tokens"], rows[rows.rows_per_epoch]["tokens"])  # reshuffled

    rng = np.random.default_rng(0)
    mask = np.zeros(32, bool); mask[5:20] = True; mask[29:] = True
    anchors, valid = sample_anchors(mask, 8, K, rng)
    assert valid.all() and np.all(np.diff(anchors) > 0)
    assert np.all(mask[anchors]) and anchors.min() >= 1 and anchors.max() <= 32 - K

    ds = make_dataset(tiny_setup["data_dir"], 32, 4, K, 2, seed=1, epochs=2)
    it = iter(ds.to_iter_dataset())
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it2 = iter(make_dataset(tiny_setup["data_dir"], 32, 4, K, 2, seed=1, epochs=2).to_iter_dataset())
    it2.set_state(state)
    for w in want:
        g = next(it2)
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])


# ------------------------------------------------------------------ step invariants


def test_step_updates_only_trainable(tiny_setup):
    """Two real steps, jitted with donation as train.run does: in the merged tree afterwards
    every frozen leaf is bit-identical to a host snapshot taken before, every _diff leaf moved,
    and the second step saw the frozen weights unchanged (its loss equals the loss recomputed
    from the snapshot). Optimizer moments exist for the _diff twins only."""
    from orthrus_jax.params import DIFF_KEYS
    from train.step import row_loss_terms

    params = init_params(TINY, jax.random.PRNGKey(1), jnp.float32, copy_diff=True)
    snapshot = jax.tree_util.tree_map(np.array, params)      # host copy, before any step
    backbone, trainable = split_params(params)
    # copy_diff twins alias their AR weights; the trainable masters are their own buffers
    trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), trainable)
    opts = LossOptions(K, jnp.float32, True, 2)
    opt = make_optimizer()
    opt_state = opt.init(trainable)
    step = jax.jit(make_train_step(TINY, opts, opt), donate_argnums=(0, 1))
    it = iter(make_dataset(tiny_setup["data_dir"], 32, 4, K, 2, 0, 1).to_iter_dataset())
    batches = [{k: jnp.asarray(v)[None] for k, v in next(it).items()} for _ in range(2)]
    tr, opt_state, m1 = step(trainable, opt_state, backbone, batches[0], jnp.float32(1e-2))
    after_one = jax.tree_util.tree_map(np.array, tr)
    tr, new_state, m2 = step(tr, opt_state, backbone, batches[1], jnp.float32(1e-2))
    assert np.isfinite(float(m2["loss"])) and float(m1["loss"]) > 0
    merged = merge_params(backbone, tr)
    moved = {p[-1].key for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(merged),
                                            jax.tree_util.tree_leaves(snapshot))
             if not np.array_equal(np.asarray(x), y)}
    assert moved == set(DIFF_KEYS)
    frozen = jax.tree_util.tree_map(jnp.asarray, split_params(snapshot)[0])
    mb = {k: v[0] for k, v in batches[1].items()}
    terms = jax.jit(row_loss_terms, static_argnums=(2, 4))(after_one, frozen, TINY, mb, opts)
    np.testing.assert_allclose(float(m2["loss"]), float(terms["kl_sum"] / terms["count"]), rtol=1e-5)
    # optimizer moments exist for the trainable tree only
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(tr))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(new_state) if x.ndim > 0)
    assert n_state == 2 * n_train
    paths = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(new_state) if x.ndim}
    assert len(paths) == 2 * len(jax.tree_util.tree_leaves(tr))
    assert all("_diff" in p for p in paths)


def test_kl_is_zero_when_views_agree():
    """The objective's helper: KL(p || p) = 0 with full agreement, and for a different student
    KL(p || q) and top-1 agreement equal torch's kl_div and argmax computed independently."""
    import torch

    from train.step import kl_and_agreement, teacher_stats
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 64))
    t = teacher_stats(logits)
    kl, agree = kl_and_agreement(t["probs"], t["neg_entropy"], t["argmax"], logits)
    np.testing.assert_allclose(kl, 0.0, atol=1e-5)
    assert bool(agree.all())

    student = logits + 0.8 * jax.random.normal(jax.random.PRNGKey(1), logits.shape)
    kl, agree = kl_and_agreement(t["probs"], t["neg_entropy"], t["argmax"], student)
    p_log = torch.log_softmax(torch.tensor(np.asarray(logits), dtype=torch.float64), -1)
    q_log = torch.log_softmax(torch.tensor(np.asarray(student), dtype=torch.float64), -1)
    want = torch.nn.functional.kl_div(q_log, p_log, log_target=True, reduction="none").sum(-1)
    assert float(want.min()) > 0.05
    np.testing.assert_allclose(np.asarray(kl), want.numpy(), rtol=1e-4, atol=1e-6)
    want_agree = np.argmax(np.asarray(student), -1) == np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(np.asarray(agree), want_agree)
    assert 0 < want_agree.sum() < want_agree.size


# ------------------------------------------------------------------ runs: sharding, resume, NaN


def test_sharded_losses_match_single_device(tiny_setup, tmp_path, monkeypatch):
    """Micro-batches of 8 rows: really split over data x fsdp (1 row per device on (8,1,1) and
    (2,4,1), 2 on (2,2,2) with tensor 2), and the losses equal the 1-device losses."""
    from orthrus_jax import sharding as shd
    from train.run import train
    assert jax.device_count() == 8
    placed = []
    put_batch = shd.put_batch
    monkeypatch.setattr(shd, "put_batch", lambda *a, **kw: placed.append(put_batch(*a, **kw))
                        or placed[-1])
    run = dict(global_batch=16, grad_accum=2, max_steps=3, save_every=100)
    ref_dir = tmp_path / "m111"
    train(tiny_cfg(tiny_setup, ref_dir, **run))
    ref = losses(ref_dir)
    for d, f, t in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
        placed.clear()
        out = tmp_path / f"m{d}{f}{t}"
        train(tiny_cfg(tiny_setup, out, mesh_data=d, mesh_fsdp=f, mesh_tensor=t, **run))
        np.testing.assert_allclose(losses(out), ref, rtol=2e-5, atol=1e-6, err_msg=f"mesh {d},{f},{t}")
        assert len(placed) == 3
        for name, x in placed[0].items():           # [accum 2, rows 8, ...]
            assert x.shape[:2] == (2, 8)
            assert x.sharding.spec[1] == ("data", "fsdp"), (name, x.sharding.spec)
            assert x.sharding.shard_shape(x.shape)[:2] == (2, 8 // (d * f)), name
            rows = {tuple(range(*s.index[1].indices(8))) for s in x.addressable_shards}
            assert len(rows) == d * f               # d * f distinct row blocks


def test_resume_reaches_same_loss(tiny_setup, tmp_path):
    from train.run import train
    full = tmp_path / "full"
    train(tiny_cfg(tiny_setup, full, max_steps=4, export_at_end=True))
    part = tmp_path / "part"   # stopped after n = 2 steps (same schedule), then resumed to 2n
    train(tiny_cfg(tiny_setup, part, max_steps=2, schedule_steps=4, save_every=100))
    assert sorted(os.listdir(part / "checkpoints")) == ["2"]
    train(tiny_cfg(tiny_setup, part, max_steps=4, schedule_steps=4, save_every=100))
    assert len(losses(part)) == 4
    np.testing.assert_allclose(losses(part), losses(full), rtol=1e-6)
    # the export is a loadable full model dir: backbone untouched, heads trained
    from orthrus_jax.checkpoint import load_model
    _, params = load_model(str(full / "model"), jnp.float32)
    _, init = load_model(tiny_setup["model_dir"], jnp.float32)
    bb, tr = split_params(params)
    bb0, tr0 = split_params(init)
    for a, b in zip(jax.tree_util.tree_leaves(bb), jax.tree_util.tree_leaves(bb0)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32))
    assert not np.array_equal(np.asarray(tr["layers"]["q_proj_diff"]), np.asarray(tr0["layers"]["q_proj_diff"]))


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_setup, tmp_path):
    from train.run import NonFiniteLoss, train
    out = tmp_path / "nan"
    train(tiny_cfg(tiny_setup, out, max_steps=2, save_every=1))
    with pytest.raises(NonFiniteLoss):
        train(tiny_cfg(tiny_setup, out, max_steps=4, save_every=1, learning_rate=float("nan")))
    assert sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())[-1] == 2
    assert len(losses(out)) == 2


def test_save_once_when_export_lands_on_a_save_step_and_log_trimmed_at_step_0(tiny_setup, tmp_path):
    """save_every=1 with an export_at_minutes export on the same step saves that step once (no
    StepAlreadyExistsError); a run that died before its first checkpoint left metrics.jsonl
    lines, and the restart from step 0 starts a fresh log (no duplicate steps)."""
    from train.run import train
    out = tmp_path / "same"
    os.makedirs(out)
    with open(out / "metrics.jsonl", "w") as f:      # the dead run's steps 1..3, no checkpoint
        f.writelines(json.dumps({"step": i, "loss": 99.0}) + "\n" for i in (1, 2, 3))
    train(tiny_cfg(tiny_setup, out, max_steps=2, save_every=1, export_at_minutes="0.0001"))
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
    assert os.path.isdir(out / "model-0.0001min")
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2]
    assert 99.0 not in losses(out)


def test_set_accepts_several_and_repeated():
    from train.run import build_parser
    a = build_parser().parse_args(["--set", "seq_len=64", "remat=false", "--set", "seed=3",
                                   "--config", "x.yaml", "--set", "seq_len=128"])
    assert a.set == ["seq_len=64", "remat=false", "seed=3", "seq_len=128"]
    cfg = load_config(None, a.set)
    assert (cfg.seq_len, cfg.remat, cfg.seed) == (128, False, 3)   # the later override wins
    assert build_parser().parse_args([]).set == []


@pytest.mark.parametrize("global_batch,grad_accum,mesh,ok", [
    (16, 2, (1, -1, 1), True),      # 8 rows over 8 devices
    (32, 2, (2, 2, 2), True),       # 16 rows over data x fsdp = 4
    (8, 2, (1, -1, 1), False),      # 4 rows over 8 devices: would be replicated
    (12, 1, (2, 4, 1), False),      # 12 rows over 8: uneven
])
def test_micro_batch_must_split_over_data_fsdp(global_batch, grad_accum, mesh, ok):
    from orthrus_jax import sharding as shd
    from orthrus_jax.config import ConfigError
    from train.run import check_micro_batch
    cfg = load_config(None, [f"global_batch={global_batch}", f"grad_accum={grad_accum}"])
    m = shd.make_mesh(*mesh)
    if ok:
        check_micro_batch(cfg, m)
    else:
        with pytest.raises(ConfigError, match=r"global_batch/grad_accum = .* data x fsdp"):
            check_micro_batch(cfg, m)
