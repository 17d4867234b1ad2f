"""Text side of generation: tokenizer loading, HF-style chat templates, incremental detokenizing."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from tokenizers import Tokenizer

from orthrus_jax.config import ConfigError


def load_tokenizer(model_dir: str) -> Tokenizer:
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found (the model directory needs its tokenizer)")
    return Tokenizer.from_file(path)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of text as HF encodes it for Qwen3 (no BOS; special tokens in text parsed)."""
    return tok.encode(text, add_special_tokens=False).ids


def joined_prompt_ids(tok: Tokenizer, prompts_path: str, n_tokens: int) -> list[int]:
    """The first n_tokens of a JSONL file's "prompt" fields joined in file order (blank line
    between them): one long prompt built from short ones, for long-context tests and benchmarks."""
    ids: list[int] = []
    with open(prompts_path) as f:
        for line in f:
            if line.strip():
                ids += encode(tok, json.loads(line)["prompt"] + "\n\n")
            if len(ids) >= n_tokens:
                return ids[:n_tokens]
    raise ConfigError(f"{prompts_path}: its prompts hold {len(ids)} tokens, fewer than the "
                      f"{n_tokens} asked for")


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def _tokenizer_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def chat_template(model_dir: str) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's chat_template."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    template = _tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def render_chat(model_dir: str, messages: list[dict[str, str]], *, enable_thinking: bool = False,
                add_generation_prompt: bool = True) -> str:
    """Render messages with the model's chat template as transformers' apply_chat_template does
    (jinja2 sandbox, trim_blocks, lstrip_blocks, loopcontrols, raise_exception, tojson).
    enable_thinking is Qwen3's switch (False adds the empty <think></think> block)."""
    template = chat_template(model_dir)
    if not template:
        raise ConfigError(f"{model_dir}: the tokenizer has no chat template (no chat_template in "
                          "tokenizer_config.json, no chat_template.jinja); run without --chat")
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    cfg = _tokenizer_config(model_dir)
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(name)
        special[name] = value.get("content") if isinstance(value, dict) else value
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking, **special)
    except jinja2.exceptions.TemplateError as err:  # raise_exception(...) or a broken template
        raise ConfigError(f"{model_dir}: the chat template failed: {err}") from None


def chat_prompt(model_dir: str, user: str, *, system: str | None = None,
                enable_thinking: bool = False) -> str:
    """One user message (after an optional system message) rendered with the model's chat
    template, ready for the assistant's reply (Qwen3's thinking off unless enable_thinking)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return render_chat(model_dir, messages, enable_thinking=enable_thinking)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back split UTF-8 characters."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.sent = tok, [], ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = decode(self.tok, self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = decode(self.tok, self.ids)
        delta, self.sent = text[len(self.sent):], text
        return delta
