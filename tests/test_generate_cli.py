"""python -m infer.generate: output formats, streaming, chat, and one-line errors (exit 2)."""
import json
import os
import subprocess
import sys

import pytest

from infer import generate as cli
from infer import text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, micro_fp32, micro_model_dir):
    from orthrus_jax.checkpoint import write_model_dir

    cfg, params = micro_fp32
    out = tmp_path_factory.mktemp("cli") / "model"
    write_model_dir(str(out), cfg, params, str(micro_model_dir))
    return str(out)


def test_stream_text_and_stats(model_dir, capsys):
    rc = cli.main(["--model", model_dir, "--prompt", "def fibonacci(n):", "--max-new-tokens",
                   "20", "--block-size", "8"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert len(out.strip()) > 0
    assert "[stats] mode=orthrus prompts=1 tokens=" in err and "tpf=" in err
    assert "acceptance_length=" in err


def test_verify_tree_matches_chain(model_dir, capsys):
    """--verify tree --tree-budget 12: the same greedy text as the chain, its nodes in the stats."""
    args = ["--model", model_dir, "--prompt", "def fibonacci(n):", "--max-new-tokens", "24",
            "--block-size", "8", "--no-stream"]
    assert cli.main(args) == 0
    chain_out, chain_err = capsys.readouterr()
    assert cli.main(args + ["--verify", "tree", "--tree-budget", "12"]) == 0
    tree_out, tree_err = capsys.readouterr()
    assert tree_out == chain_out
    assert "nodes_per_cycle=7.0" in chain_err and "nodes_per_cycle=12.0" in tree_err


def test_json_batched_matches_api(model_dir, micro_fp32, tmp_path, capsys):
    prompts = ["import os\n", "class Foo:\n    def", "x = 1\ny ="]
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rc = cli.main(["--model", model_dir, "--prompts-file", str(pf), "--json", "--max-new-tokens",
                   "12", "--block-size", "8", "--batch-size", "2", "--mode", "ar"])
    out, err = capsys.readouterr()
    assert rc == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        assert set(r) == {"prompt", "text", "token_ids", "stats"}
        assert set(r["stats"]) == {"tokens", "forward_passes", "tpf", "acceptance_length",
                                   "tokens_per_s", "ttft_s"}
        assert r["stats"]["tokens"] == len(r["token_ids"]) <= 12
    from infer.decoder import generate

    cfg, params = micro_fp32
    tok = text.load_tokenizer(model_dir)
    api = generate(params, cfg, [text.encode(tok, p) for p in prompts], mode="ar",
                   max_new_tokens=12)
    assert [r["token_ids"] for r in rows] == [a.token_ids for a in api]
    assert rows[0]["text"] == text.decode(tok, api[0].token_ids)


def test_chat_template_rendering(tmp_path):
    tpl = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
           "{% if enable_thinking is defined and enable_thinking is false %}"
           "<think>\n\n</think>\n\n{% endif %}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl}))
    msgs = [{"role": "user", "content": "hi"}]
    assert text.render_chat(str(tmp_path), msgs) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text.render_chat(str(tmp_path), msgs, enable_thinking=True).endswith(
        "<|im_start|>assistant\n")


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--chat"], "has no chat template"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "word " * 80, "--max-len", "64"], "cache holds 64"),
    (["--prompts-file", "/nonexistent.jsonl"], "prompts file not found"),
    (["--prompts-file", "{bad}"], "bad.jsonl:2: field \"prompt\" must be a non-empty string, got 5"),
    (["--prompts-file", "{empty}"], "empty.jsonl:1: field \"prompt\" must be a non-empty string"),
    (["--prompt", "hi", "--block-size", "0"], "block_size must be >= 2, got 0"),
    (["--prompt", "hi", "--max-len", "0"], "max_len must be in 1..4096"),
    (["--prompt", "hi", "--max-len", "100000"], "max_len must be in 1..4096"),
    (["--prompt", "hi", "--verify", "tree", "--tree-budget", "0"], "tree_budget must be >= 1"),
    (["--prompt", "hi", "--verify", "tree", "--mode", "ar"], "verify 'tree' needs mode 'orthrus'"),
])
def test_errors_one_line(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": 5}\n')
    (tmp_path / "empty.jsonl").write_text('{"prompt": ""}\n')
    args = [a.format(bad=tmp_path / "bad.jsonl", empty=tmp_path / "empty.jsonl") for a in args]
    rc = cli.main(["--model", model_dir, *args])
    _, err = capsys.readouterr()
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_chat_template_exception_is_one_line(model_dir, tmp_path, capsys):
    """A template that calls raise_exception (as Qwen3's does on bad roles) ends in one line."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg_path.chmod(0o644)
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = "{{ raise_exception('System role not supported') }}"
    cfg_path.write_text(json.dumps(tok_cfg))
    assert cli.main(["--model", str(d), "--prompt", "hi", "--chat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {d}: the chat template failed: System role not supported"


def test_sampling_flags_ignored_when_greedy(model_dir, capsys):
    """--top-p 0 and --top-k -1 are sampling filters; greedy decoding ignores them (as --help says)."""
    assert cli.main(["--model", model_dir, "--prompt", "x = 1", "--max-new-tokens", "4",
                     "--top-p", "0", "--top-k", "-1", "--no-stream"]) == 0
    capsys.readouterr()


def test_missing_model_dir_subprocess(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "infer.generate", "--model",
                           str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: model directory does not exist"]


def test_help_mentions_every_flag():
    helptext = cli.build_parser().format_help()
    for flag in ("--model", "--prompt", "--prompts-file", "--chat", "--max-new-tokens",
                 "--temperature", "--top-k", "--top-p", "--seed", "--mode", "--block-size",
                 "--batch-size", "--json", "--dtype", "--max-len", "--no-stream", "--system",
                 "--enable-thinking", "--verify", "--tree-budget"):
        assert flag in helptext
