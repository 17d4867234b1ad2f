"""Greedy Orthrus == our AR greedy == HF transformers generate, token for token, fp32, micro model.

Plus batching (ragged rows, exact max_new per row), EOS inside an accepted block, bucketing
without recompiles, streaming == the while_loop, stats identities, clear errors.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decoder
from infer.decoder import GenerationError, generate
from orthrus_jax.params import DIFF_KEYS, init_params
from orthrus_jax.paths import DEV_PROMPTS

N_PROMPTS = 20
NEW = 64
PAD = 384  # every dev prompt fits: one length bucket, so few compiles
# tree verification with more nodes than the chain's K-1 = 7 at K = 8: real branching
VERIFY = {"chain": {}, "tree": {"verify": "tree", "tree_budget": 12}}


@pytest.fixture(scope="module")
def prompt_ids(micro_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(micro_model_dir / "tokenizer.json"))
    with open(DEV_PROMPTS) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:N_PROMPTS]
    return [tok.encode(p, add_special_tokens=False).ids for p in prompts]


@pytest.fixture(scope="module")
def hf_refs(micro_model_dir, prompt_ids):
    """HF transformers greedy generate, fp32, one prompt at a time (EOS respected)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(micro_model_dir), dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=NEW)
            refs.append(out[0, len(ids):].tolist())
    return refs


@pytest.fixture(scope="module")
def params_copied(micro_fp32):
    return micro_fp32[1]


@pytest.fixture(scope="module")
def params_random(micro_fp32):
    cfg, params = micro_fp32
    rnd = init_params(cfg, jax.random.PRNGKey(7), jnp.float32)
    layers = dict(params["layers"])
    layers.update({k: rnd["layers"][k] for k in DIFF_KEYS})
    return {**params, "layers": layers}


def _check_equal(results, refs):
    for i, (r, ref) in enumerate(zip(results, refs)):
        assert r.token_ids == ref, f"prompt {i}: first diff at " + str(
            next((j for j, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b),
                 min(len(r.token_ids), len(ref))))


def test_hf_refs_sane(hf_refs):
    assert len(hf_refs) == N_PROMPTS
    assert any(len(r) < NEW and r[-1] == 0 for r in hf_refs), "want an EOS case among the refs"
    assert any(len(r) == NEW for r in hf_refs)


@pytest.mark.parametrize("batch", [1, 4])
def test_ar_greedy_matches_hf(micro_fp32, params_copied, prompt_ids, hf_refs, batch):
    cfg, _ = micro_fp32
    res = generate(params_copied, cfg, prompt_ids, mode="ar", max_new_tokens=NEW,
                   batch_size=batch, pad_to=PAD)
    _check_equal(res, hf_refs)
    for r in res:
        assert r.stats.tpf == 1.0 and r.stats.forward_passes == r.stats.tokens


@pytest.mark.parametrize("diff,batch,verify", [
    ("copied", 1, "chain"), ("copied", 4, "chain"), ("random", 1, "chain"), ("random", 4, "chain"),
    ("copied", 1, "tree"), ("copied", 4, "tree")])
def test_orthrus_greedy_matches_hf(request, micro_fp32, prompt_ids, hf_refs, batch, diff, verify):
    """Chain and tree verification (tree: the default budget K-1 = 31 nodes) equal HF greedy."""
    cfg, _ = micro_fp32
    params = request.getfixturevalue(f"params_{diff}")
    res = generate(params, cfg, prompt_ids, mode="orthrus", max_new_tokens=NEW,
                   batch_size=batch, pad_to=PAD, verify=verify)
    _check_equal(res, hf_refs)
    assert all(r.stats.nodes_per_cycle == 31 for r in res if r.stats.cycles)
    summary = decoder.summarize(res)
    if diff == "copied":
        assert summary["acceptance_length"] > 0.2  # some drafts accepted
    else:
        assert summary["acceptance_length"] < 0.2  # mostly rejected, output still exact
        assert summary["acceptance_hist"][0] > 0.8 * summary["cycles"]


@pytest.mark.parametrize("k", [4, 8, 16])
def test_block_sizes(micro_fp32, params_copied, prompt_ids, hf_refs, k):
    cfg, _ = micro_fp32
    res = generate(params_copied, cfg, prompt_ids[:4], mode="orthrus", max_new_tokens=NEW,
                   batch_size=4, block_size=k, pad_to=PAD)
    _check_equal(res, hf_refs[:4])
    assert all(len(r.stats.acceptance_hist) == k for r in res)


@pytest.mark.parametrize("verify", list(VERIFY))
def test_max_new_exact_per_row_and_stats(micro_fp32, params_copied, prompt_ids, hf_refs, verify):
    cfg, _ = micro_fp32
    prompts = [prompt_ids[i] for i in (0, 3, 5, 2)]  # ragged; hf_refs[2] is [EOS]
    for max_new in (1, 7, 13):
        res = generate(params_copied, cfg, prompts, max_new_tokens=max_new, batch_size=4,
                       block_size=8, pad_to=PAD, **VERIFY[verify])
        for i, r in zip((0, 3, 5, 2), res):
            assert r.token_ids == hf_refs[i][:max_new]
            s = r.stats
            assert s.finish_reason == ("eos" if r.token_ids[-1] == 0 else "length")
            assert s.forward_passes == 1 + 2 * s.cycles
            assert s.tpf == pytest.approx(s.tokens / (1 + 2 * s.cycles))
            assert sum(s.acceptance_hist) == s.cycles
            pos = s.position_acceptance
            assert all(a >= b for a, b in zip(pos, pos[1:]))  # a prefix is accepted
            assert s.acceptance_length == pytest.approx(sum(pos))
            assert _committed_identity(s)
            assert s.ttft_s > 0 and s.tokens_per_s > 0
            if s.cycles:
                assert s.nodes_per_cycle == (7 if verify == "chain" else 12)


def _committed_identity(s) -> bool:
    """tokens = 1 (prefill) + per cycle: the drafts counted + the correction/bonus, which only a
    row's last cycle can lose to an EOS / max_new_tokens cut."""
    drafts = round(s.acceptance_length * s.cycles)
    return s.tokens - 1 - s.cycles <= drafts <= s.tokens - s.cycles


@pytest.mark.parametrize("verify", ["chain", "tree"])
def test_acceptance_counts_only_emitted_drafts(verify):
    """The trained demo heads accept whole blocks once the text loops; a max_new_tokens cut
    mid-block (tree: mid-path) must not count the accepted drafts it drops (in the mean or the
    histogram)."""
    from tokenizers import Tokenizer

    from orthrus_jax.checkpoint import load_model
    from tests.conftest import REPO

    cfg, params = load_model(str(REPO / "checkpoints" / "demo"), jnp.float32)
    ids = Tokenizer.from_file(str(REPO / "checkpoints" / "demo" / "tokenizer.json")).encode(
        "def fibonacci(n):").ids
    for max_new in (40, 64, 100):
        s = generate(params, cfg, [ids], max_new_tokens=max_new, batch_size=1,
                     verify=verify)[0].stats
        assert s.tokens == max_new and _committed_identity(s), (max_new, s)
        assert sum(n * c for n, c in enumerate(s.acceptance_hist)) <= s.tokens - 1 - s.cycles + 1


@pytest.mark.parametrize("verify", list(VERIFY))
def test_eos_inside_accepted_block(micro_fp32, params_copied, prompt_ids, hf_refs, verify):
    """Pick a token that was an accepted draft (not the correction) in some cycle, declare it EOS:
    generation must stop right after its first occurrence, inside the block (tree: inside the
    accepted path)."""
    cfg, _ = micro_fp32
    kw = VERIFY[verify]
    for i, ids in enumerate(prompt_ids):
        chunks = []
        generate(params_copied, cfg, [ids], max_new_tokens=NEW, batch_size=1, block_size=8,
                 pad_to=PAD, on_tokens=lambda _r, new: chunks.append(new), **kw)
        flat = [t for c in chunks for t in c]
        assert flat == hf_refs[i]
        start = 0
        for c in chunks:
            # c = [accepted drafts..., correction]; c[0] is an accepted draft if len(c) >= 3
            if len(c) >= 3 and c[0] not in flat[:start] and c[0] != 0:
                eos = c[0]
                res = generate(params_copied, cfg, [ids], max_new_tokens=NEW, batch_size=1,
                               block_size=8, pad_to=PAD, eos_token_ids=[eos], **kw)
                assert res[0].token_ids == flat[: start + 1]
                assert res[0].stats.finish_reason == "eos"
                return
            start += len(c)
    pytest.fail("no cycle with >= 2 accepted drafts found")


def test_two_eos_ids_stop_at_whichever_comes_first(micro_fp32, params_copied, prompt_ids):
    """eos_token_ids with two ids (as Qwen3's <|im_end|> and <|endoftext|>): in one batch, each
    row stops right after the first occurrence of either id (row 0 at the first id, row 1 at the
    second), in AR and Orthrus mode; the unstopped continuation is the reference."""
    cfg, _ = micro_fp32
    prompts = prompt_ids[:2]
    free = [r.token_ids for r in generate(params_copied, cfg, prompts, mode="ar", max_new_tokens=32,
                                          batch_size=2, pad_to=PAD, eos_token_ids=[])]

    def first(ids, tok):
        return ids.index(tok) if tok in ids else len(ids)

    pairs = ((a, b) for a in free[0][2:20] for b in free[1][2:20] if a != b)
    pick = next(((a, b) for a, b in pairs if first(free[0], a) < first(free[0], b)
                 and first(free[1], b) < first(free[1], a) and first(free[0], a) >= 2
                 and first(free[1], b) >= 2), None)
    assert pick is not None, "no pair of tokens that ends the two rows at different ids"
    a, b = pick
    want = [free[0][: first(free[0], a) + 1], free[1][: first(free[1], b) + 1]]
    for mode in ("ar", "orthrus"):
        res = generate(params_copied, cfg, prompts, mode=mode, max_new_tokens=32, batch_size=2,
                       block_size=8, pad_to=PAD, eos_token_ids=[a, b])
        assert [r.token_ids for r in res] == want, mode
        assert [r.stats.finish_reason for r in res] == ["eos", "eos"], mode


@pytest.mark.parametrize("verify", list(VERIFY))
def test_streaming_equals_loop(micro_fp32, params_copied, prompt_ids, hf_refs, verify):
    cfg, _ = micro_fp32
    prompts = prompt_ids[:3]
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    streamed = generate(params_copied, cfg, prompts, max_new_tokens=40, batch_size=4,
                        block_size=8, pad_to=PAD, on_tokens=lambda r, new: got[r].extend(new),
                        **VERIFY[verify])
    looped = generate(params_copied, cfg, prompts, max_new_tokens=40, batch_size=4,
                      block_size=8, pad_to=PAD, **VERIFY[verify])
    for i in range(3):
        assert got[i] == streamed[i].token_ids == looped[i].token_ids == hf_refs[i][:40]


def test_buckets_do_not_recompile(micro_fp32, params_copied):
    cfg, _ = micro_fp32
    kw = dict(max_new_tokens=6, block_size=4, batch_size=4)
    generate(params_copied, cfg, [[5] * 20, [6] * 30, [7] * 17, [8] * 25], **kw)  # bucket 32 x 4
    before = dict(decoder.TRACE_COUNTS)
    res = generate(params_copied, cfg, [[9] * 31, [10] * 19, [11] * 22], **kw)  # 3 rows -> 4
    res += generate(params_copied, cfg, [[12] * 28, [13] * 26, [14] * 29, [15] * 24], mode="orthrus",
                    seed=3, **kw)
    assert dict(decoder.TRACE_COUNTS) == before
    assert all(len(r.token_ids) >= 1 for r in res)
    generate(params_copied, cfg, [[5] * 40], **kw)  # a new length bucket compiles once more
    assert decoder.TRACE_COUNTS["loop"] == before["loop"] + 1


def test_errors(micro_fp32, params_copied):
    cfg, _ = micro_fp32
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(params_copied, cfg, [[5, 6], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match="cache holds 64"):
        generate(params_copied, cfg, [[5] * 70], max_new_tokens=4, max_len=64)
    with pytest.raises(GenerationError, match="cache holds 4096"):
        generate(params_copied, cfg, [[5] * 4095], max_new_tokens=4)
    with pytest.raises(GenerationError, match="mode"):
        generate(params_copied, cfg, [[5]], mode="beam")
    with pytest.raises(GenerationError, match="outside vocab"):
        generate(params_copied, cfg, [[cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="verify must be one of"):
        generate(params_copied, cfg, [[5]], verify="beam")
    with pytest.raises(GenerationError, match="needs mode 'orthrus'"):
        generate(params_copied, cfg, [[5]], mode="ar", verify="tree")
    with pytest.raises(GenerationError, match="tree_budget must be >= 1"):
        generate(params_copied, cfg, [[5]], verify="tree", tree_budget=0)


def test_bucket_helpers():
    assert [decoder.length_bucket(n) for n in (1, 16, 17, 24, 25, 33, 300, 385)] == \
        [16, 16, 24, 24, 32, 48, 384, 512]
    assert [decoder.batch_bucket(n, 32) for n in (1, 3, 4, 5, 32)] == [1, 4, 4, 8, 32]
    assert decoder.batch_bucket(5, 6) == 6
    assert [decoder.new_bucket(n) for n in (1, 64, 65, 256)] == [64, 64, 128, 256]
    np.testing.assert_array_equal(decoder._pad_batch([[1, 2], [3]], 5, 4)[2], [5, 5, 0, 0])
