"""train.make_data: resuming with another --limit, refusing other settings, --chat formatting.

Generation is replaced by a deterministic fake (a function of the prompt ids), so these tests
are about the bookkeeping, not the model."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from infer.text import encode, load_tokenizer, render_chat
from orthrus_jax.config import ConfigError
from train import make_data as md

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}"
            "<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.fixture
def fake_generate(monkeypatch):
    """Continuation of prompt p: 3 tokens from sum(p); records the prompts of every call."""
    calls = []

    def generate(params, cfg, prompts, max_new, **kw):
        calls.append([list(p) for p in prompts])
        return [[(sum(p) + i) % 100 + 2 for i in range(3)] for p in prompts]
    monkeypatch.setattr(md, "greedy_generate", generate)
    return calls


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n    return x + {i}"}) + "\n"
                            for i in range(6)))
    return str(path)


def docs(out):
    """The documents of a finished data dir, as (tokens, mask) lists."""
    toks, mask, off = (np.load(os.path.join(out, f"{n}.npy")) for n in ("tokens", "mask", "offsets"))
    return [(toks[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]


def run(model, prompts, out, limit, **kw):
    return md.make_data(str(model), prompts, str(out), 3, limit=limit, chunk_size=4, **kw)


def test_larger_limit_regenerates_the_short_chunk(micro_model_dir, prompts, tmp_path, fake_generate):
    out = tmp_path / "grow"
    run(micro_model_dir, prompts, out, 2)               # chunk 0 holds prompts 0, 1
    assert len(docs(out)) == 2
    fake_generate.clear()
    run(micro_model_dir, prompts, out, 6)               # chunk 0 must hold 0..3, chunk 1 4..5
    assert [len(c) for c in fake_generate] == [4, 2]    # chunk 0 made again, then chunk 1
    fresh = tmp_path / "fresh"
    run(micro_model_dir, prompts, fresh, 6)
    assert docs(out) == docs(fresh) and len(docs(out)) == 6
    assert json.loads((out / "meta.json").read_text())["num_prompts"] == 6


def test_smaller_limit_uses_the_first_prompts(micro_model_dir, prompts, tmp_path, fake_generate):
    out = tmp_path / "shrink"
    run(micro_model_dir, prompts, out, 6)
    six = docs(out)
    fake_generate.clear()
    run(micro_model_dir, prompts, out, 2)               # no AssertionError: chunk 0 is cut
    assert fake_generate == [] and docs(out) == six[:2]
    assert json.loads((out / "meta.json").read_text())["limit"] == 2
    run(micro_model_dir, prompts, out, 6)               # and back: everything is still there
    assert fake_generate == [] and docs(out) == six


def test_other_settings_refused_before_meta_is_touched(micro_model_dir, prompts, tmp_path,
                                                       fake_generate, capsys):
    out = tmp_path / "other"
    run(micro_model_dir, prompts, out, 2)
    meta = (out / "meta.json").read_text()
    capsys.readouterr()
    rc = md.main(["--model", str(micro_model_dir), "--prompts", prompts, "--out", str(out),
                  "--max-new-tokens", "5", "--limit", "2", "--chunk-size", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --out ") and str(out) in err
    assert "max_new_tokens" in err and len(err.splitlines()) == 1
    assert (out / "meta.json").read_text() == meta
    with pytest.raises(ConfigError, match="chat"):      # --chat is another setting too
        run(micro_model_dir, prompts, out, 2, chat=True)


@pytest.fixture
def chat_model(micro_model_dir, tmp_path):
    """The micro model with a small Qwen3-style chat template (no thinking when disabled)."""
    model = tmp_path / "chat-model"
    shutil.copytree(micro_model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return model


def test_chat_formats_prompts_as_context(chat_model, prompts, tmp_path, fake_generate):
    out = tmp_path / "chat"
    run(chat_model, prompts, out, 2, chat=True, system="Be brief.")
    tok = load_tokenizer(str(chat_model))
    texts = md.read_prompts(prompts, 2)
    for text, (toks, mask) in zip(texts, docs(out)):
        rendered = render_chat(str(chat_model), [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": text}])
        assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        ids = encode(tok, rendered)
        assert toks[: len(ids)] == ids and mask == [0] * len(ids) + [1] * 3
        assert toks[len(ids):] == [(sum(ids) + i) % 100 + 2 for i in range(3)]
    assert json.loads((out / "meta.json").read_text())["chat"] is True


def test_chat_without_template_is_one_line(micro_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "nochat"
    rc = md.main(["--model", str(micro_model_dir), "--prompts", prompts, "--out", str(out),
                  "--chat"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "has no chat template" in err, err
    assert not out.exists()                              # nothing written


def test_eval_accept_formats_prompts_as_make_data(chat_model, prompts, monkeypatch):
    """train.eval_accept --chat decodes the prompts exactly as make_data --chat wrote them, and
    reports the decoder's statistics for each setting."""
    from train import eval_accept

    seen = []
    real = eval_accept.generate

    def spy(params, cfg, ids, **kw):
        seen.append([list(x) for x in ids])
        return real(params, cfg, ids, **kw)
    monkeypatch.setattr(eval_accept, "generate", spy)
    out = eval_accept.evaluate(str(chat_model), prompts, n=2, max_new_tokens=8,
                               settings=("greedy",), chat=True, system="Be brief.")
    tok = load_tokenizer(str(chat_model))
    assert seen[0] == md.prompt_ids(tok, str(chat_model), md.read_prompts(prompts, 2), 1024,
                                    chat=True, system="Be brief.")
    g = out["greedy"]
    assert out["chat"] and g["prompts"] == 2 and g["tokens"] == 16
    assert g["forward_passes"] == 2 + 2 * g["cycles"] and len(g["position_acceptance"]) == 31
