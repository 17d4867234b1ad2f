"""infer.engine: continuous batching over slots equals the batch decoder; per-slot settings.

Greedy rows equal infer.decoder.generate token for token (AR and Orthrus, prompts longer than a
prefill chunk, more prompts than slots); a seed gives the same tokens in any slot; mixed
temperature / top-k / top-p / greedy rows in one batch each match the exact AR marginals
(chi-square); generate stops when a slot finishes; a wave of prompts enters in one step and the
cycles run on the occupied rows only; a long prompt enters chunk by chunk while others decode; cancel frees a slot before the next step; one compile serves mixed settings.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decoder, engine
from infer.decoder import GenerationError
from infer.engine import Engine, Request
from orthrus_jax import spec as S
from orthrus_jax.config import Qwen3Config
from orthrus_jax.params import init_params

from test_decoder_sampling import NEW, P_MIN, PROMPT, V, chi2_pvalue, exact_marginals, tiny  # noqa: F401,E501


@pytest.fixture(scope="module")
def small():
    """A random model with a real vocabulary size and positions for chunked prefill."""
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, mask_token_id=1,
                      max_position_embeddings=512, eos_token_ids=(0,))
    params = init_params(cfg, jax.random.PRNGKey(3), jnp.float32)
    params["lm_head"] = params["lm_head"] * 3.0
    return cfg, params


def _prompts(n, lo=3, hi=90, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _run(eng, reqs):
    for r in reqs:
        eng.submit(r)
    while eng.has_work():
        eng.run_once()
    return [r.tokens for r in reqs]


@pytest.mark.parametrize("mode", ["ar", "orthrus"])
def test_greedy_equals_batch_decoder(small, mode):
    cfg, params = small
    prompts = _prompts(7)  # several longer than the 32-token chunk; 7 prompts on 3 slots
    max_new = [5, 30, 17, 2, 24, 9, 30]
    free = decoder.generate(params, cfg, prompts, mode=mode, max_new_tokens=30, eos_token_ids=())
    eos = (free[1].token_ids[6],)  # a token some row emits mid-way: an EOS that really stops
    full = decoder.generate(params, cfg, prompts, mode=mode, max_new_tokens=30, eos_token_ids=eos)
    ref = [r.token_ids[:m] for r, m in zip(full, max_new)]  # greedy: a prefix per limit
    eng = Engine(params, cfg, slots=3, max_len=128, mode=mode, chunk=32, steps=4,
                 eos_token_ids=eos)
    reqs = [Request(p, m) for p, m in zip(prompts, max_new)]
    assert _run(eng, reqs) == ref
    assert reqs[1].finish_reason == "stop" and len(ref[1]) < 30
    assert {r.finish_reason for r in reqs} == {"stop", "length"}


def test_generate_all_matches_and_keeps_order(small):
    cfg, params = small
    prompts = _prompts(5, seed=1)
    ref = decoder.generate(params, cfg, prompts, mode="orthrus", max_new_tokens=12)
    got = engine.generate_all(params, cfg, prompts, mode="orthrus", max_new_tokens=12, slots=2)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert decoder.summarize(got)["tokens"] == decoder.summarize(ref)["tokens"]
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        engine.generate_all(params, cfg, [[3], []], max_new_tokens=4)


def test_seed_same_output_in_any_slot(small):
    cfg, params = small
    eng = Engine(params, cfg, slots=4, max_len=128, mode="orthrus", chunk=32, steps=3)
    prompt = _prompts(1, seed=5)[0]

    def req(seed=11):
        return Request(prompt, 20, temperature=0.9, top_p=0.9, top_k=50, seed=seed)

    alone = _run(eng, [req()])[0]
    fillers = [Request(p, 25, temperature=1.0, seed=i) for i, p in enumerate(_prompts(3, seed=6))]
    r = req()
    crowded = _run(eng, fillers + [r])
    assert r.slot == 3 and crowded[-1] == alone
    assert _run(eng, [req(seed=12)])[0] != alone


def test_generate_stops_when_a_slot_finishes(small):
    cfg, params = small
    eng = Engine(params, cfg, slots=2, max_len=96, mode="ar", chunk=32, steps=16,
                 eos_token_ids=())
    a, b = Request([5, 6, 7], 3), Request([8, 9], 40)
    eng.submit(a), eng.submit(b)
    eng.run_once()  # both prefilled (first token each), then one generate call
    assert a.done and a.finish_reason == "length" and len(a.tokens) == 3
    assert not b.done and eng.cycle_count == 2 and len(b.tokens) == 3  # stopped early
    c = eng.submit(Request([4], 2))
    eng.run_once()
    assert c.slot == 0  # the freed slot took the next request at once


def test_wave_enters_in_one_step_and_cycles_run_on_occupied_rows(small, monkeypatch):
    """Every waiting prompt (within a chunk) is prefilled in the first step; generate runs on
    the lowest power-of-two rows that hold the active slots, with the batch decoder's tokens."""
    cfg, params = small
    rows = []
    real = engine.generate_jit

    def spy(params, spec, state, limit, r=None):
        rows.append(r)
        return real(params, spec, state, limit, r)

    monkeypatch.setattr(engine, "generate_jit", spy)
    eng = Engine(params, cfg, slots=8, max_len=96, mode="ar", chunk=32, steps=4,
                 eos_token_ids=())
    prompts = _prompts(3, hi=30, seed=7)
    reqs = [eng.submit(Request(p, 6)) for p in prompts]
    eng.run_once()
    assert [len(r.tokens) > 0 for r in reqs] == [True] * 3 and rows == [4]
    while eng.has_work():
        eng.run_once()
    ref = decoder.generate(params, cfg, prompts, mode="ar", max_new_tokens=6, eos_token_ids=())
    assert [r.tokens for r in reqs] == [r.token_ids for r in ref]
    assert set(rows) == {4}  # slots 0..2 busy to the end: never the engine's 8 rows


def test_long_prompt_interleaves_with_decoding(small):
    cfg, params = small
    eng = Engine(params, cfg, slots=2, max_len=256, mode="ar", chunk=32, steps=2,
                 eos_token_ids=())
    a = eng.submit(Request([5, 6], 100))
    eng.run_once()
    long = eng.submit(Request(list(range(2, 130)), 4))  # 128 tokens = 4 chunks
    seen = []
    for _ in range(4):
        before = len(a.tokens)
        eng.run_once()
        seen.append((long.prefilled, len(a.tokens) > before))
    assert seen == [(32, True), (64, True), (96, True), (128, True)]
    ref = decoder.generate(params, cfg, [list(range(2, 130))], mode="ar", max_new_tokens=4,
                           eos_token_ids=())[0].token_ids
    while not long.done:
        eng.run_once()
    assert long.tokens == ref


def test_cancel_frees_the_slot_before_the_next_step(small):
    cfg, params = small
    eng = Engine(params, cfg, slots=1, max_len=96, mode="orthrus", chunk=32, steps=2,
                 eos_token_ids=())
    a = eng.submit(Request([5, 6], 60))
    eng.run_once()
    steps = eng.step_count
    eng.cancel(a)
    b = eng.submit(Request([7], 3))
    eng.run_once()
    assert a.finish_reason == "cancelled" and eng.cancel_steps == [0]
    assert b.slot == 0 and eng.step_count == steps + 1


def test_request_checks(small):
    cfg, params = small
    eng = Engine(params, cfg, slots=1, max_len=64, mode="ar", top_k_cap=32)
    for req, msg in [(Request([], 4), "empty"), (Request([3] * 60, 8), "cache holds 64"),
                     (Request([600], 4), "outside the vocabulary"),
                     (Request([3], 4, temperature=1.0, top_k=33), "top_k must be in 0..32"),
                     (Request([3], 4, temperature=1.0, top_p=0.0), "top_p must be in"),
                     (Request([3], 0), "max_new_tokens must be >= 1")]:
        with pytest.raises(GenerationError, match=msg):
            eng.submit(req)


def test_mixed_settings_one_compile_each_row_exact(tiny):
    """Rows with different temperature / top-k / top-p, and greedy rows, share one batch and
    one compiled generate; each sampled group matches its exact AR marginals."""
    cfg, params = tiny
    settings = [(0.7, 6, 0.8), (1.3, 0, 0.9)]
    rows = 1024
    eng = Engine(params, cfg, slots=512, max_len=16, mode="orthrus", chunk=32, steps=NEW,
                 eos_token_ids=())
    before = decoder.TRACE_COUNTS["generate"]
    reqs = []
    for i in range(rows):
        t, k, p = settings[i % 2]
        reqs.append(Request(PROMPT, NEW, temperature=t, top_k=k, top_p=p, seed=1000 + i))
        if i % 64 == 0:
            reqs.append(Request(PROMPT, NEW))  # greedy rows in the same batches
    _run(eng, reqs)
    assert decoder.TRACE_COUNTS["generate"] - before == 1
    greedy = [r.tokens for r in reqs if r.temperature == 0]
    assert all(g == greedy[0] for g in greedy)
    for j, (t, k, p) in enumerate(settings):
        toks = np.array([r.tokens for r in reqs if r.temperature == t])
        assert toks.shape == (rows // 2, NEW)
        margs = exact_marginals(cfg, params, t, k, p)
        for pos in range(NEW):
            pv = chi2_pvalue(np.bincount(toks[:, pos], minlength=V), margs[pos])
            assert pv > P_MIN, f"setting {j}, position {pos}: chi-square p={pv:.2g}"


@pytest.mark.parametrize("case", ["mixed", "narrow", "wide top_k"])
def test_process_logits_rows_matches_per_row(case):
    """Per-row settings give process_logits' distribution row by row, whichever candidates the
    batch takes: the narrow NARROW_CANDIDATES (every top_k fits, top_p off: they must), the cap's
    (a top_k above them: they cannot), or either (mixed)."""
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (5, 3, 1000))
    temps = jnp.array([0.7, 1.0, 0.5, 2.0, 1.0])
    top_p, top_k = {
        "mixed": ([0.8, 0.8, 1.0, 0.95, 1.0], [20, 0, 5, 0, 0]),
        "narrow": ([1.0, 1.0, 1.0, 1.0, 1.0], [20, 0, 5, S.NARROW_CANDIDATES, 1]),
        "wide top_k": ([0.9, 1.0, 1.0, 1.0, 0.8], [20, S.NARROW_CANDIDATES + 36, 5, 0, 0]),
    }[case]
    top_p, top_k = jnp.array(top_p), jnp.array(top_k, jnp.int32)
    rows = S.process_logits_rows(logits, temps, top_p, top_k, top_k_cap=256)
    for i in range(5):
        ref = S.process_logits(logits[i], float(temps[i]), float(top_p[i]), top_k=int(top_k[i]),
                               use_top_p=float(top_p[i]) < 1.0)
        np.testing.assert_array_equal(np.isinf(rows[i]), np.isinf(ref))
        np.testing.assert_allclose(np.where(np.isinf(ref), 0, rows[i]),
                                   np.where(np.isinf(ref), 0, ref), atol=1e-5)
    flat = 0.01 * jax.random.normal(jax.random.PRNGKey(3), (2, 1000))  # the full-sort path
    rows = S.process_logits_rows(flat, jnp.ones(2), jnp.array([0.9, 1.0]), jnp.zeros(2, jnp.int32),
                                 top_k_cap=64)
    ref = S.process_logits(flat[:1], 1.0, 0.9)
    np.testing.assert_array_equal(np.isinf(rows[:1]), np.isinf(ref))
    assert not np.isinf(rows[1]).any()


# ---------------------------------------------------------------------------------------------
# tree verification (verify="tree") on the engine

TREE = {"verify": "tree", "tree_budget": 12, "block_size": 8}  # more nodes than K-1 = 7: branching
TREE_NEW = 40


@pytest.fixture(scope="module")
def demo():
    """The demo checkpoint (trained diffusion heads: multi-token paths are accepted), fp32, and
    six dev prompts cut to ragged lengths within one 64-token prefill chunk."""
    import json

    from tokenizers import Tokenizer

    from orthrus_jax.checkpoint import load_model
    from orthrus_jax.paths import DEMO_MODEL_DIR, DEV_PROMPTS

    cfg, params = load_model(str(DEMO_MODEL_DIR), jnp.float32)
    tok = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    with open(DEV_PROMPTS) as f:
        texts = [json.loads(line)["prompt"] for line in f][:6]
    cut = [60, 23, 47, 35, 64, 30]
    return cfg, params, [tok.encode(t, add_special_tokens=False).ids[:n]
                         for t, n in zip(texts, cut)]


def _accepted_cycles(chunks):
    """Output indices of the cycles that accepted >= 2 drafts (a cycle's tokens: accepted
    drafts, then the correction or bonus; chunks[0] is the prefill's)."""
    starts = np.cumsum([len(c) for c in chunks])[:-1]
    return [int(s) for s, c in zip(starts, chunks[1:]) if len(c) >= 3]


def test_tree_greedy_equals_ar(demo):
    """Greedy tree verification through the engine equals AR token for token (fp32): at batch 1,
    and in a ragged batch of 4 slots refilled from 6 requests with an EOS that is an accepted
    draft inside a path, a max_new_tokens that cuts a path, and a request that fills its cache
    row exactly (prompt + max_new_tokens = max_len: the tree needs no more cache than that)."""
    cfg, params, prompts = demo
    max_len = max(map(len, prompts)) + TREE_NEW
    ar = decoder.generate(params, cfg, prompts, mode="ar", max_new_tokens=TREE_NEW,
                          eos_token_ids=())
    # batch 1, one cycle per call: each delivery after the first token is one cycle's tokens
    one = Engine(params, cfg, slots=1, max_len=max_len, mode="orthrus", chunk=64, steps=1,
                 eos_token_ids=(), **TREE)
    chunks = [[], []]
    reqs = [Request(p, TREE_NEW, on_tokens=(lambda i: lambda _r, ids: chunks[i].append(ids))(i))
            for i, p in enumerate(prompts[:2])]
    assert _run(one, reqs) == [r.token_ids for r in ar[:2]]
    st = one.result(reqs[0]).stats
    assert st.nodes_per_cycle == 12 and st.acceptance_length > 1.0
    assert st.position_acceptance[1] > 0 and len(st.position_acceptance) == 7
    # an EOS inside an accepted path (row 0), a max_new_tokens cut inside one (row 1)
    row0, row1 = ar[0].token_ids, ar[1].token_ids
    at, cut_at = next((a, c) for a in _accepted_cycles(chunks[0])
                      for c in _accepted_cycles(chunks[1])
                      if row0[a] not in row0[:a] + row1[: c + 1])
    eos = row0[at]
    # greedy AR with this EOS: each row up to and including its first EOS, then max_new_tokens
    ref = [r.token_ids[: r.token_ids.index(eos) + 1] if eos in r.token_ids else r.token_ids
           for r in ar]
    max_new = [TREE_NEW, cut_at + 1, 17, 9, TREE_NEW, 30]
    four = Engine(params, cfg, slots=4, max_len=max_len, mode="orthrus", chunk=64, steps=3,
                  eos_token_ids=(eos,), **TREE)
    reqs = [Request(p, m) for p, m in zip(prompts, max_new)]
    assert _run(four, reqs) == [r[:m] for r, m in zip(ref, max_new)]
    assert reqs[0].tokens == ar[0].token_ids[: at + 1] and reqs[0].finish_reason == "stop"
    assert len(reqs[1].tokens) == cut_at + 1 and reqs[1].finish_reason == "length"
    assert len(prompts[4]) + max_new[4] == max_len
    # statistics are per request: a refilled slot's counters start afresh
    assert reqs[4].slot is not None and reqs[5].slot is not None
    for r in reqs:
        s = four.result(r).stats
        assert sum(s.acceptance_hist) == s.cycles > 0 and s.nodes_per_cycle == 12


def test_tree_sampling_exact_mixed_settings(tiny):
    """Tree verification (K 4, 6 nodes: siblings at depth 1..3) through the engine: rows with
    different temperature / top-k / top-p and greedy rows share one batch, each sampled group
    matches its exact AR marginals at positions 0..3 (1..3 from the first tree's depths), and a
    seed gives the same tokens in another slot."""
    cfg, params = tiny
    settings = [(1.0, 0, 1.0), (0.7, 6, 0.8)]
    rows = 1024
    eng = Engine(params, cfg, slots=512, max_len=16, mode="orthrus", chunk=32, steps=NEW,
                 eos_token_ids=(), verify="tree", tree_budget=6)
    reqs = []
    for i in range(rows):
        t, k, p = settings[i % 2]
        reqs.append(Request(PROMPT, NEW, temperature=t, top_k=k, top_p=p, seed=5000 + i))
        if i % 64 == 0:
            reqs.append(Request(PROMPT, NEW))
    twin = Request(PROMPT, NEW, temperature=1.0, seed=5000)  # reqs[0]'s settings and seed
    reqs.append(twin)
    _run(eng, reqs)
    assert twin.slot != reqs[0].slot and twin.tokens == reqs[0].tokens
    greedy = [r.tokens for r in reqs if r.temperature == 0]
    assert all(g == greedy[0] for g in greedy)
    hist = np.sum([eng.result(r).stats.acceptance_hist for r in reqs], axis=0)
    assert hist[0] > 0 and hist[2:].sum() > 0  # rejections and paths of 2+ drafts
    for j, (t, k, p) in enumerate(settings):
        toks = np.array([r.tokens for r in reqs[:-1] if r.temperature == t])
        assert toks.shape == (rows // 2, NEW)
        margs = exact_marginals(cfg, params, t, k, p)
        for pos in range(NEW):
            pv = chi2_pvalue(np.bincount(toks[:, pos], minlength=V), margs[pos])
            assert pv > P_MIN, f"setting {j}, position {pos}: chi-square p={pv:.2g}"
