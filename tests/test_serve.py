"""python -m infer.serve with the real openai client, against servers started on 127.0.0.1.

One server (Orthrus mode, K 8, --verify tree of 12 nodes, 4 slots x 128 positions, --api-key; the
chain is the engine tests' default) on a copy of the micro model
with a ChatML template serves: completions and chat, streamed and not, equal to HF transformers
generate (fp32) for 64 concurrent greedy requests (and /metrics shows the tree's nodes per cycle
and per-depth acceptance); stop strings; every bad input (4xx, OpenAI
error JSON, and the next request unharmed); a client that disconnects mid-stream (its slot freed
within one engine step); the key. A second start on the same persistent compilation cache
compiles nothing (the cache's own hit/miss events), answers 429 past its queue bound, and on
SIGTERM finishes the stream in flight and exits 0. Every server is stopped, even on failure.
"""
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx  # the openai client's HTTP library
import numpy as np
import pytest

from infer import text
from infer.metrics import parse_text
from orthrus_jax.paths import DEV_PROMPTS, REPO_ROOT

KEY = "sk-test-key"
NAME = "micro"
NEW = 8
MAX_LEN = 128
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and enable_thinking is false %}"
          "<think>\n\n</think>\n\n{% endif %}{% endif %}")
SERVER_ARGS = ["--served-model-name", NAME, "--slots", "4", "--max-len", str(MAX_LEN),
               "--prefill-chunk-size", "32", "--mode", "orthrus", "--block-size", "8",
               "--verify", "tree", "--tree-budget", "12"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, cache, extra, log, env=None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        base_env = dict(os.environ, ORTHRUS_JAX_COMPILATION_CACHE_DIR=str(cache),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
        base_env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it (unless env says)
        env = {**base_env, **(env or {})}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infer.serve", "--model", str(model), "--port",
             str(self.port), *SERVER_ARGS, *extra], cwd=REPO_ROOT, env=env, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.log_path = log

    def wait_ready(self, timeout=600.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode}: "
                            f"{open(self.log_path).read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        pytest.fail("server did not become ready")

    def metrics(self):
        return parse_text(httpx.get(self.base + "/metrics", timeout=10).text)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, micro_model_dir):
    """A copy of the micro model with a ChatML chat template (it ships without one)."""
    out = tmp_path_factory.mktemp("serve") / "micro-chat"
    shutil.copytree(micro_model_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def server(chat_model, cache_dir, tmp_path_factory):
    srv = Server(chat_model, cache_dir, ["--api-key", KEY, "--max-queue", "64"],
                 tmp_path_factory.mktemp("log") / "first.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def hf(chat_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(chat_model))

    def generate(ids, new=NEW):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=new)
        return out[0, len(ids):].tolist()
    return generate, tok


@pytest.fixture(scope="module")
def tok(chat_model):
    return text.load_tokenizer(str(chat_model))


def _finish(ids):
    return "stop" if ids and ids[-1] == 0 else "length"


def test_models_health_and_key(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.base + "/health").status_code == 200
    before = server.metrics()
    body = {"model": NAME, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.base + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base + "/v1/models").status_code == 401
    after = server.metrics()
    assert after['orthrus_requests_total{status="401"}'] == 4
    assert after["orthrus_prompt_tokens_total"] == before["orthrus_prompt_tokens_total"]


def test_completion_stream_and_not_equal_hf(client, hf, tok):
    generate, _ = hf
    prompt = "def fibonacci(n):"
    ref = generate(text.encode(tok, prompt))
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == text.decode(tok, ref)
    assert r.choices[0].finish_reason == _finish(ref)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(text.encode(tok, prompt)),
                                                                  len(ref))
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == _finish(ref)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)
    ids = client.completions.create(model=NAME, prompt=text.encode(tok, prompt),
                                    max_tokens=NEW, temperature=0)
    assert ids.choices[0].text == r.choices[0].text  # a prompt as token ids


def test_chat_stream_and_not_equal_hf(client, hf, tok):
    generate, hf_tok = hf
    msgs = [{"role": "user", "content": "Write a function that adds two numbers."}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False,
                                     tokenize=True, return_dict=False)
    ref = generate(list(ids))
    r = client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=NEW,
                                       temperature=0)
    assert r.choices[0].message.content == text.decode(tok, ref)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=NEW,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == _finish(ref)


def test_64_concurrent_greedy_equal_hf(server, hf, tok):
    import openai

    generate, _ = hf
    with open(DEV_PROMPTS) as f:
        prompts = [text.encode(tok, json.loads(line)["prompt"])[-100:] for line in f][:64]
    refs = [generate(p) for p in prompts]
    before = server.metrics()

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
        async with client:
            return await asyncio.gather(*[
                client.completions.create(model=NAME, prompt=p, max_tokens=NEW, temperature=0)
                for p in prompts])

    out = asyncio.run(run())
    assert [o.usage.completion_tokens for o in out] == [len(r) for r in refs]
    assert [o.choices[0].text for o in out] == [text.decode(tok, r) for r in refs]
    assert [o.choices[0].finish_reason for o in out] == [_finish(r) for r in refs]
    m = server.metrics()
    cycles = m["orthrus_draft_cycles_total"] - before["orthrus_draft_cycles_total"]
    assert m["orthrus_draft_nodes_total"] - before["orthrus_draft_nodes_total"] == 12 * cycles > 0
    depth = [m[f'orthrus_depth_acceptance{{depth="{d}"}}'] for d in range(1, 8)]
    assert depth[0] > 0 and all(a >= b for a, b in zip(depth, depth[1:]))
    assert m["orthrus_acceptance_length"] == pytest.approx(sum(depth), rel=1e-4)


def test_stop_string_and_seed(client):
    full = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=16,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=16,
                                    temperature=0, stop=[stop, "@@@"])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kw = dict(model=NAME, prompt="import os", max_tokens=12, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 40})
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_k": 100000}, 400, "top_k"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user"}]}, 400, "messages"),
]


def test_bad_inputs_get_openai_errors_and_harm_nobody(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body, status, param in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.base + path, headers=headers, timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], (body, err)
    ok = client.completions.create(model=NAME, prompt="x = 1", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert server.metrics()["orthrus_slots_busy"] == 0


def test_disconnect_frees_slot_within_one_step(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "def main():", "max_tokens": MAX_LEN - 8,
            "temperature": 1.0, "stream": True, "seed": 1}
    before = server.metrics()["orthrus_cancelled_total"]
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk read, then the client goes away
    for _ in range(200):
        m = server.metrics()
        if m["orthrus_cancelled_total"] > before and m["orthrus_slots_busy"] == 0:
            break
        time.sleep(0.1)
    assert m["orthrus_cancelled_total"] == before + 1 and m["orthrus_slots_busy"] == 0
    assert m["orthrus_cancel_to_free_steps_max"] <= 1


@pytest.fixture(scope="module")
def second(server, chat_model, cache_dir, tmp_path_factory):
    """A second start on the first one's compilation cache (the first is stopped first)."""
    first = server.metrics()
    server.stop()
    srv = Server(chat_model, cache_dir, ["--max-queue", "2"],
                 tmp_path_factory.mktemp("log") / "second.log")
    try:
        yield first, srv.wait_ready()
    finally:
        srv.stop()


def test_second_start_compiles_nothing(second):
    first, srv = second
    assert first["orthrus_jax_cache_misses_total"] > 0
    r = httpx.post(srv.base + "/v1/completions", json={"model": NAME, "prompt": "x = 1",
                                                        "max_tokens": 6, "temperature": 0.5})
    assert r.status_code == 200
    m = srv.metrics()
    assert m["orthrus_jax_cache_misses_total"] == 0 and m["orthrus_jax_cache_hits_total"] > 0


def test_queue_full_gets_429(second):
    _, srv = second

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": NAME, "prompt": "x", "max_tokens": 30, "temperature": 0}
            return await asyncio.gather(*[c.post(srv.base + "/v1/completions", json=body)
                                          for _ in range(16)])

    out = asyncio.run(burst())
    codes = [r.status_code for r in out]
    assert set(codes) == {200, 429} and codes.count(200) >= 2  # the queue holds 2, at least
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in out
               if r.status_code == 429)


def test_sigterm_finishes_in_flight_and_exits_0(second):
    _, srv = second
    body = {"model": NAME, "prompt": "def main():", "max_tokens": 40, "temperature": 0,
            "stream": True}
    got = []
    with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line[6:])
                if len(got) == 1:
                    srv.proc.send_signal(signal.SIGTERM)
    assert got[-1] == "[DONE]"
    finish = [json.loads(g)["choices"][0]["finish_reason"] for g in got[:-1]]
    assert finish[-1] in ("stop", "length")
    assert srv.proc.wait(timeout=60) == 0
    assert np.all([f is None for f in finish[:-1]])


def test_refuses_when_the_cache_does_not_fit(micro_model_dir):
    """slots x max-len beyond free memory: one line naming both flags, exit 2, before loading."""
    proc = subprocess.run([sys.executable, "-m", "infer.serve", "--model", str(micro_model_dir),
                           "--slots", "1000000", "--max-len", "4096"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --slots 1000000 x --max-len 4096 "
                                                   "does not fit: KV cache")
