"""python -m infer.serve: an OpenAI-compatible server on the continuous-batching engine.

    python -m infer.serve [--model DIR] [--served-model-name NAME] [--host 127.0.0.1]
        [--port 8000] [--slots N] [--max-len N] [--mode orthrus|ar] [--verify chain|tree]
        [--tree-budget N] [--api-key KEY]

POST /v1/completions and /v1/chat/completions (stream or not), GET /v1/models, /health and
/metrics (Prometheus text). One background thread runs the engine (infer.engine.Engine); HTTP
handlers hand it requests and read their tokens back through per-request asyncio queues. See
README "Serving".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, AsyncIterator, Sequence

from starlette.requests import Request  # FastAPI resolves handler annotations at module level

from orthrus_jax.cli import (
    ArgumentParser, add_parallel_arguments, add_prefill_chunk_argument, add_verify_arguments,
    default_compute_dtype, parse_dtype,
)
from orthrus_jax.paths import DEMO_MODEL_DIR, default_path

GIB = 1024 ** 3


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m infer.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"model directory (Orthrus or HF); default {default_path(DEMO_MODEL_DIR)}")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--slots", type=int, default=8,
                   help="requests decoded together (rows of the KV cache); default 8")
    p.add_argument("--max-len", type=int, default=2048,
                   help="cache positions per slot: prompt + max_tokens must fit (default 2048)")
    p.add_argument("--mode", choices=("orthrus", "ar"), default="orthrus",
                   help="orthrus: diffusion draft + AR verify (default); ar: one token per pass")
    p.add_argument("--block-size", type=int, default=None,
                   help="K, tokens per draft block; default: the model's block_size")
    add_verify_arguments(p)
    p.add_argument("--dtype", type=parse_dtype, default=None,
                   help="weights and KV cache precision: fp32, bf16 or fp16 (default bf16 on "
                        "GPU/TPU, fp32 on CPU)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (401 otherwise); default "
                        "$ORTHRUS_API_KEY, else no key")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot, at most; more get 429 (default 256)")
    p.add_argument("--steps", type=int, default=None,
                   help="cycles per engine call, at most (default 8 orthrus, 16 ar)")
    add_prefill_chunk_argument(p, note="; a long prompt enters chunk by chunk between decode "
                                       "steps")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds to let requests in flight finish before they are "
                        "cancelled (default 30)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling the engine's programs before accepting requests")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    add_parallel_arguments(p, distributed=False)  # this host's devices; slots over data
    return p


# ---------------------------------------------------------------------------------------------
# start-up checks


def available_memory(device: Any) -> tuple[int, str]:
    """Free bytes where the cache and weights will live: the device's memory stats, or on CPU
    the host's available RAM."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), \
            f"{device.platform} device memory"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available RAM"


def memory_estimate(cfg: Any, slots: int, max_len: int, itemsize: int, k: int) -> dict[str, int]:
    """Bytes of the KV cache, the weights and the largest per-cycle work buffers."""
    from orthrus_jax.checkpoint import leaf_shapes

    kv = 2 * cfg.num_layers * slots * max_len * cfg.num_kv_heads * cfg.head_dim * itemsize
    weights = sum(math.prod(s) for s in leaf_shapes(cfg).values()) * itemsize
    # fp32 logits and processed distributions of a cycle, and one layer's attention scores
    work = 4 * (4 * slots * k * cfg.vocab_size + 2 * slots * k * cfg.num_heads * max_len)
    return {"kv_cache": kv, "weights": weights, "work": work}


def check_fits(cfg: Any, slots: int, max_len: int, itemsize: int, k: int, device: Any,
               tensor: int = 1, data: int = 1) -> None:
    """On a tensor x data mesh, per device: the cache over slots (data) and KV heads (tensor,
    when they divide), weights and work over tensor and data."""
    from orthrus_jax.config import ConfigError

    need = memory_estimate(cfg, slots, max_len, itemsize, k)
    kv_split = tensor if cfg.num_kv_heads % tensor == 0 else 1
    need = {"kv_cache": need["kv_cache"] // (data * kv_split),
            "weights": need["weights"] // tensor, "work": need["work"] // data}
    free, where = available_memory(device)
    total = sum(need.values())
    if total > free:
        raise ConfigError(
            f"--slots {slots} x --max-len {max_len} does not fit: KV cache "
            f"{need['kv_cache'] / GIB:.2f} GiB + weights {need['weights'] / GIB:.2f} GiB + work "
            f"{need['work'] / GIB:.2f} GiB = {total / GIB:.2f} GiB, {where} {free / GIB:.2f} GiB "
            "free; lower --slots or --max-len")


def sampling_defaults(model_dir: str) -> Any:
    """Omitted sampling fields take generation_config.json's values (as vLLM)."""
    from infer.openai_api import Sampling

    path = os.path.join(model_dir, "generation_config.json")
    gen = {}
    if os.path.exists(path):
        with open(path) as f:
            gen = json.load(f)
    d = Sampling()
    return Sampling(temperature=float(gen.get("temperature", d.temperature)),
                    top_p=float(gen.get("top_p", d.top_p)), top_k=int(gen.get("top_k", d.top_k)))


# ---------------------------------------------------------------------------------------------
# the engine thread


class EngineLoop:
    """Runs Engine.run_once in one thread while there is work; submit/cancel from any thread."""

    def __init__(self, engine: Any, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Any) -> None:
        from infer.decoder import GenerationError
        from infer.openai_api import APIError

        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", type_="server_error")
            if self.engine.queue_depth >= self.max_queue:
                raise APIError(429, f"too many requests waiting ({self.max_queue}); retry later",
                               type_="rate_limit_error")
            try:
                self.engine.submit(req)
            except GenerationError as err:
                raise APIError(400, str(err), "prompt") from None
            self.cond.notify()

    def cancel(self, req: Any) -> None:
        with self.cond:
            self.engine.cancel(req)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.engine.has_work() and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.engine.has_work():
                    return
            try:
                self.engine.run_once()
            except Exception as err:  # noqa: BLE001 - every request in flight gets the error
                print(f"engine error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                self.engine.fail_all()

    def stop(self) -> None:
        """Cancel what is still in flight and end the thread."""
        with self.cond:
            self.stopping = True
            for r in list(self.engine.waiting) + [r for r in self.engine.slots if r]:
                self.engine.cancel(r)
            self.cond.notify()
        self.thread.join(timeout=60)


# ---------------------------------------------------------------------------------------------
# the app


class Server:
    """What the handlers share: model files, tokenizer, engine loop, metrics."""

    def __init__(self, args: argparse.Namespace, model_dir: str, name: str, engine: Any,
                 tok: Any):
        from infer.metrics import Metrics

        self.args, self.model_dir, self.name, self.tok = args, model_dir, name, tok
        self.engine = engine
        self.loop = EngineLoop(engine, args.max_queue)
        self.defaults = sampling_defaults(model_dir)
        self.created = int(time.time())
        self.cache_events = {"hits": 0, "misses": 0}
        self.metrics = Metrics({
            "queue_depth": ("Requests waiting for a slot", lambda: engine.queue_depth),
            "slots_busy": ("Slots holding a request", lambda: engine.busy_slots),
            "slots_total": ("Slots of the engine", lambda: engine.spec.slots),
            "engine_steps_total": ("Engine generate calls", lambda: engine.step_count),
            "engine_cycles_total": ("Decode cycles run", lambda: engine.cycle_count),
            "cancel_to_free_steps_max": ("Most engine steps between a cancel and its slot's "
                                         "release", lambda: max(engine.cancel_steps, default=0)),
            "jax_cache_hits_total": ("Persistent compilation cache hits in this process",
                                     lambda: self.cache_events["hits"]),
            "jax_cache_misses_total": ("Persistent compilation cache misses in this process",
                                       lambda: self.cache_events["misses"]),
        })

    def on_cache_event(self, event: str, **_kw: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_events["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.cache_events["misses"] += 1

    def record_finish(self, r: Any) -> None:
        """Engine thread: per-request counters when the engine lets go of a request."""
        res = self.engine.result(r)
        m = self.metrics
        m.inc("prompt_tokens_total", len(r.prompt))
        m.inc("generation_tokens_total", res.stats.tokens)
        m.inc("forward_passes_total", res.stats.forward_passes)
        if self.engine.spec.mode == "orthrus":
            m.inc("draft_cycles_total", res.stats.cycles)
            m.inc("accepted_drafts_total", sum(i * c for i, c in
                                               enumerate(res.stats.acceptance_hist)))
            m.inc("draft_nodes_total", r.nodes)
            for d, c in enumerate(r.pos_acc if r.pos_acc is not None else []):
                m.inc("depth_accepted_total", int(c), label=f'{{depth="{d + 1}"}}')
        if r.finish_reason == "cancelled":
            m.inc("cancelled_total")
        if r.t_first is not None:
            m.observe_ttft(r.t_first - r.t_submit)


def error_response(err: Any) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status)


class AuthMiddleware:
    """Pure ASGI: /v1/* needs `Authorization: Bearer KEY` (401 otherwise, before any handler)."""

    def __init__(self, app: Any, api_key: str | None, metrics: Any):
        self.app, self.key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.key}":
                from infer.openai_api import APIError

                self.metrics.inc("requests_total", label='{status="401"}')
                err = APIError(401, "Incorrect API key provided: send `Authorization: Bearer "
                               "KEY`", type_="invalid_request_error", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(srv: Server) -> Any:
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from infer import openai_api as api
    from infer import text
    from infer.engine import Request as EngineRequest

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        srv.loop.start()
        yield
        srv.loop.stop()

    app = FastAPI(title="orthrus-jax", lifespan=lifespan)
    spec = srv.engine.spec

    def count(status: int) -> None:
        srv.metrics.inc("requests_total", label=f'{{status="{status}"}}')

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": srv.name, "object": "model", "created": srv.created, "owned_by": "orthrus-jax",
            "root": srv.model_dir, "max_model_len": spec.max_len}]}

    def prompt_ids(p: api.Parsed) -> list[int]:
        from orthrus_jax.config import ConfigError

        if p.chat:
            try:
                rendered = text.render_chat(srv.model_dir, p.messages,
                                            enable_thinking=p.enable_thinking)
            except ConfigError as err:
                raise api.APIError(400, str(err), "messages") from None
            return text.encode(srv.tok, rendered)
        return p.prompt_ids if p.prompt_ids is not None else text.encode(srv.tok, p.prompt_text)

    def make_request(p: api.Parsed, ids: list[int], queue: asyncio.Queue) -> Any:
        n, cap = len(ids), spec.max_len
        if n == 0:
            raise api.APIError(400, "the prompt has no tokens", "prompt")
        if n >= cap:
            raise api.APIError(400, f"the prompt has {n} tokens but the cache holds {cap} "
                                    "(prompt + max_tokens must fit)", "prompt")
        max_new = p.max_tokens if p.max_tokens is not None else cap - n
        if n + max_new > cap:
            param = "max_completion_tokens" if p.chat else "max_tokens"
            raise api.APIError(400, f"the prompt has {n} tokens; with {param}={max_new} it needs "
                                    f"{n + max_new} positions but the cache holds {cap}", param)
        loop = asyncio.get_running_loop()

        def on_tokens(_r, new):
            loop.call_soon_threadsafe(queue.put_nowait, ("tokens", new))

        def on_finish(r):
            srv.record_finish(r)
            loop.call_soon_threadsafe(queue.put_nowait, ("end", r.finish_reason))

        return EngineRequest(ids, max_new, p.temperature, p.top_p, p.top_k, p.seed,
                             on_tokens=on_tokens, on_finish=on_finish)

    async def deltas(req: Any, queue: asyncio.Queue, p: api.Parsed) -> AsyncIterator[tuple]:
        """(text delta, finish_reason or None) as the engine commits tokens; cancels the request
        when the consumer goes away or a stop string ends it."""
        sd = text.StreamDecoder(srv.tok)
        stops = api.StopChecker(p.stop)
        full, sent = "", 0
        try:
            while True:
                kind, val = await queue.get()
                if kind == "tokens":
                    full += sd.push(val)
                    safe, hit = stops.check(full)
                    if hit:
                        srv.loop.cancel(req)
                        yield safe[sent:], "stop"
                        return
                    if len(safe) > sent:
                        yield safe[sent:], None
                        sent = len(safe)
                    continue
                if val == "error":
                    raise api.APIError(500, "the engine failed on this request",
                                       type_="server_error")
                if val == "cancelled":
                    raise api.APIError(503, "the request was cancelled (server shutting down)",
                                       type_="server_error")
                full += sd.flush()
                safe, hit = stops.check(full)
                out = safe if hit else full
                yield out[sent:], "stop" if (hit or val == "stop") else "length"
                return
        finally:
            if not req.done:
                srv.loop.cancel(req)

    async def handle(request: Request, chat: bool):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise api.APIError(400, f"the request body is not valid JSON: {err}") from None
            p = api.parse(body, chat=chat, model_name=srv.name, vocab_size=srv.engine.cfg.vocab_size,
                          defaults=srv.defaults, top_k_cap=spec.top_k_cap)
            ids = prompt_ids(p)
            queue: asyncio.Queue = asyncio.Queue()
            req = make_request(p, ids, queue)
            srv.loop.submit(req)
        except api.APIError as err:
            count(err.status)
            return error_response(err)
        rid = api.new_id(chat)
        if not p.stream:
            parts, finish = [], "length"
            try:
                async for delta, fin in deltas(req, queue, p):
                    parts.append(delta)
                    finish = fin or finish
            except api.APIError as err:
                count(err.status)
                return error_response(err)
            count(200)
            return JSONResponse(api.response(chat, rid, srv.name, "".join(parts), finish,
                                             api.usage(len(ids), len(req.tokens))))

        async def events():
            def sse(obj: Any) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            if chat:
                yield sse(api.chunk(chat, rid, srv.name, "", None, role=True))
            try:
                async for delta, fin in deltas(req, queue, p):
                    if delta or fin:
                        yield sse(api.chunk(chat, rid, srv.name, delta if delta or not chat
                                            else None, fin))
            except api.APIError as err:
                count(err.status)
                yield sse(err.body())
                yield "data: [DONE]\n\n"
                return
            count(200)
            if p.include_usage:
                yield sse(api.chunk(chat, rid, srv.name, None, None, no_choice=True,
                                    use=api.usage(len(ids), len(req.tokens))))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return AuthMiddleware(app, srv.args.api_key, srv.metrics)


# ---------------------------------------------------------------------------------------------
# main


def serve(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from infer import engine as E
    from infer import text
    from orthrus_jax.checkpoint import load_any_model
    from orthrus_jax.config import ConfigError, load_config
    from orthrus_jax.paths import shipped
    from orthrus_jax.sharding import inference_mesh

    model_dir = args.model or shipped(DEMO_MODEL_DIR, "--model")
    name = args.served_model_name or os.path.basename(os.path.normpath(model_dir))
    args.api_key = args.api_key or os.environ.get("ORTHRUS_API_KEY") or None
    for flag, value, lo in (("--slots", args.slots, 1), ("--max-len", args.max_len, 2),
                            ("--max-queue", args.max_queue, 0), ("--port", args.port, 0),
                            ("--tensor-parallel-size", args.tensor_parallel_size, 1),
                            ("--data-parallel-size", args.data_parallel_size, 1)):
        if value < lo:
            raise ConfigError(f"{flag} must be >= {lo}, got {value}")
    cfg = load_config(model_dir)
    if args.max_len > cfg.max_position_embeddings:
        raise ConfigError(f"--max-len {args.max_len} exceeds the model's "
                          f"max_position_embeddings {cfg.max_position_embeddings}")
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    mesh = None
    if tp * dp > 1:
        mesh = inference_mesh(cfg, tp, dp, jax.local_devices())
        if args.slots % dp:
            raise ConfigError(f"--slots {args.slots} must be divisible by --data-parallel-size "
                              f"{dp}")
    dtype = jnp.dtype(args.dtype or default_compute_dtype())
    k = int(args.block_size or cfg.block_size) if args.mode == "orthrus" else 1
    if args.mode == "orthrus" and args.verify == "tree":  # a cycle's AR pass covers the tree
        k = max(k, 1 + (k - 1 if args.tree_budget is None else args.tree_budget))
    check_fits(cfg, args.slots, args.max_len, jnp.dtype(dtype).itemsize, k, jax.devices()[0],
               tp, dp)
    tok = text.load_tokenizer(model_dir)
    cfg, params = load_any_model(model_dir, dtype, mesh, inference=True)
    chunk = min(args.prefill_chunk_size, E.chunk_width(args.max_len))
    try:
        engine = E.Engine(params, cfg, slots=args.slots, max_len=args.max_len, mode=args.mode,
                          block_size=args.block_size, steps=args.steps, chunk=chunk,
                          verify=args.verify, tree_budget=args.tree_budget, mesh=mesh)
    except E.GenerationError as err:
        raise ConfigError(str(err)) from None
    srv = Server(args, model_dir, name, engine, tok)
    jax.monitoring.register_event_listener(srv.on_cache_event)
    if not args.no_warmup:
        t0 = time.perf_counter()
        engine.warmup()
        print(f"[serve] warm-up (compiling or loading the engine's programs): "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    import uvicorn

    app = create_app(srv)
    mode = f"{args.mode}, tree of {engine.spec.tree_budget}" if engine.spec.verify == "tree" \
        else args.mode
    print(f"[serve] {name} ({mode}, {args.slots} slots x {args.max_len} positions, top_k "
          f"<= {engine.spec.top_k_cap}, tensor {tp} x data {dp}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (stop accepting, let requests in
    # flight finish within --graceful-timeout, then the engine cancels the rest), and re-raises
    # the signal to the handler found at start: a no-op one, so the process exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    print("[serve] stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from orthrus_jax.cli import run_cli

    args = build_parser().parse_args(argv)
    rc = 0

    def go() -> None:
        nonlocal rc
        rc = serve(args)

    return run_cli(go) or rc


if __name__ == "__main__":
    sys.exit(main())
