"""Serving load test: our OpenAI-compatible server (AR and Orthrus modes) against the peer,
`transformers serve --continuous-batching`, driven by the same asyncio openai client.

    python -m bench.serve [--model checkpoints/demo] [--hf-dir testbed/micro-qwen3]
        [--concurrency 1,4,16,32] [--num-prompts 32] [--max-tokens 64] [--modes ar,orthrus]
        [--tree-budget N]

For each server (one at a time: each is stopped before the next starts, so they never share
the CPU) and each sampling setting (greedy; T 0.7 / top-p 0.8 / top-k 20), every concurrency c
runs --num-prompts streamed completions of the dev prompts with c in flight: output tokens/s,
requests/s, time to first token (TTFT) and inter-token latency (ITL: per request, (last text
chunk - first text chunk) / (tokens - 1)) at p50 and p99, and (ours) the acceptance length from
/metrics. --modes may add `tree`: Orthrus with --verify tree (--tree-budget nodes, default K-1),
with its nodes verified per cycle. Server logs go to a temporary directory (printed). Records JSON, markdown and a PNG under bench/results.
Targets (reported, never asserted): our AR >= 5x the peer's output tokens/s at concurrency 16,
with a lower p99 TTFT.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from bench import common
from orthrus_jax import paths
from orthrus_jax.cli import ArgumentParser

MODES = ("ar", "orthrus", "tree")  # tree: orthrus with --verify tree
SETTINGS = {"greedy": {"temperature": 0.0},
            "t0.7-p0.8-k20": {"temperature": 0.7, "top_p": 0.8, "top_k": 20}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], port: int, log_path: str, timeout: float = 900.0):
    """Start a server command, wait for GET /health, always stop it (SIGTERM, then kill)."""
    import httpx2 as httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=paths.REPO_ROOT)
        try:
            t0 = time.time()
            while True:
                if proc.poll() is not None:
                    raise common.UsageError(f"{cmd[0]} exited {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                if time.time() - t0 > timeout:
                    raise common.UsageError(f"server not ready after {timeout:.0f} s; see "
                                            f"{log_path}")
                time.sleep(0.5)
            yield time.time() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _metrics(port: int) -> dict[str, float]:
    import httpx2 as httpx

    from infer.metrics import parse_text

    try:
        return parse_text(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    except Exception:  # noqa: BLE001 - the peer has no Prometheus endpoint
        return {}


async def _one(client: Any, model: str, prompt: str, max_tokens: int, sampling: dict,
               seed: int, top_k: bool = True) -> dict[str, Any]:
    extra = {"top_k": sampling["top_k"]} if ("top_k" in sampling and top_k) else {}
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, stream=True, seed=seed,
        temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0),
        stream_options={"include_usage": True}, extra_body=extra)
    times, texts, usage = [], [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            texts.append(chunk.choices[0].text)
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (times[0] - t0) if times else end - t0, "chunk_times": times,
            "tokens": usage, "text": "".join(texts), "latency": end - t0}


async def _load(base: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                sampling: dict, top_k: bool = True) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    queue = list(enumerate(prompts))
    results: list[dict | None] = [None] * len(prompts)

    async def worker():
        while queue:
            i, p = queue.pop(0)
            results[i] = await _one(client, model, p, max_tokens, sampling, seed=i, top_k=top_k)

    async with client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return results, wall  # type: ignore[return-value]


def _summary(results: list[dict], wall: float, tok: Any) -> dict[str, Any]:
    ntoks = []
    for r in results:
        n = r["tokens"] if r["tokens"] is not None else len(tok.encode(
            r["text"], add_special_tokens=False).ids)  # the peer may omit usage
        ntoks.append(n)
    itl = []
    for r, n in zip(results, ntoks):
        t = r["chunk_times"]
        if len(t) > 1 and n > 1:
            itl.append((t[-1] - t[0]) / (n - 1))  # per request: mean time per further token
    ttft = [r["ttft"] for r in results]
    total = int(sum(ntoks))
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"requests": len(results), "output_tokens": total, "wall_s": wall,
            "output_tok_s": total / wall, "req_s": len(results) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def bench_server(name: str, cmd: list[str], port: int, model: str, prompts: list[str],
                 args: argparse.Namespace, tok: Any, log_path: str, top_k: bool = True
                 ) -> list[dict[str, Any]]:
    """top_k=False: never send top_k (transformers serve answers 422 to it)."""
    rows = []
    with running(cmd, port, log_path) as ready_s:
        print(f"{name}: ready after {ready_s:.1f} s", flush=True)
        base = f"http://127.0.0.1:{port}/v1"
        # one untimed request per setting: lazy loads and first compiles happen outside timing
        for sampling in SETTINGS.values():
            asyncio.run(_load(base, model, prompts[:1], 1, 4, sampling, top_k))
        for sname, sampling in SETTINGS.items():
            for c in args.concurrency:
                m0 = _metrics(port)
                res, wall = asyncio.run(_load(base, model, prompts, c, args.max_tokens, sampling,
                                              top_k))
                m1 = _metrics(port)
                row = {"server": name, "setting": sname if top_k or "top_k" not in sampling
                       else sname + " (no top_k)", "concurrency": c,
                       **_summary(res, wall, tok)}
                cyc = m1.get("orthrus_draft_cycles_total", 0) - m0.get(
                    "orthrus_draft_cycles_total", 0)
                acc = m1.get("orthrus_accepted_drafts_total", 0) - m0.get(
                    "orthrus_accepted_drafts_total", 0)
                row["acceptance_length"] = acc / cyc if cyc else None
                nodes = m1.get("orthrus_draft_nodes_total", 0) - m0.get(
                    "orthrus_draft_nodes_total", 0)
                row["nodes_per_cycle"] = nodes / cyc if cyc else None
                rows.append(row)
                al = f", AL {row['acceptance_length']:.3f}" if row["acceptance_length"] else ""
                print(f"{name:12s} {sname:14s} c={c:3d} {row['output_tok_s']:8.1f} tok/s "
                      f"{row['req_s']:6.2f} req/s TTFT p50/p99 {row['ttft_p50_s']:.3f}/"
                      f"{row['ttft_p99_s']:.3f} s ITL p50/p99 {row['itl_p50_s'] or 0:.4f}/"
                      f"{row['itl_p99_s'] or 0:.4f} s{al}", flush=True)
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = [common.md_preamble("Serving load test", record)]
    backend = record["machine"].get("backend", "?")
    # records before --dtype: ours took its platform default (bf16 on GPU/TPU), the peer fp32
    ours_dtype = record["args"].get("dtype") or ("bfloat16 (its default there)"
                                                 if backend in ("gpu", "tpu") else "float32")
    peer = (f"the peer (transformers {record['transformers']}) on torch device "
            f"{record.get('peer_device', 'cpu')} in {record['args'].get('dtype', 'float32')}"
            if "transformers" in record else "no peer in this run")
    lines.append(f"- ours on jax's {backend} backend in {ours_dtype}, {peer}")
    lines.append("- ITL = per request, (last chunk - first chunk) / (tokens - 1); Orthrus streams "
                 "several tokens per chunk. " + common.scale_caveat(record["machine"]) + "\n")
    rows = [[r["server"], r["setting"], r["concurrency"], f"{r['output_tok_s']:.1f}",
             f"{r['req_s']:.2f}", f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p99_s']:.3f}",
             f"{r['itl_p50_s'] or 0:.4f}", f"{r['itl_p99_s'] or 0:.4f}",
             "" if r["acceptance_length"] is None else f"{r['acceptance_length']:.3f}",
             "" if r.get("nodes_per_cycle") is None else f"{r['nodes_per_cycle']:.1f}"]
            for r in record["runs"]]
    lines.append(common.md_table(["server", "setting", "conc.", "out tok/s", "req/s",
                                  "TTFT p50 s", "TTFT p99 s", "ITL p50 s", "ITL p99 s", "AL",
                                  "nodes/cycle"], rows))
    lines.append("\n## Targets\n")
    lines += [f"- {t['status']} {t['target']}: {t['detail']}" for t in record["targets"]]
    return "\n".join(lines) + "\n"


def plot(path: str, record: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sname in zip(axes, SETTINGS):
        for server in dict.fromkeys(r["server"] for r in record["runs"]):
            rs = [r for r in record["runs"]
                  if r["server"] == server and r["setting"].startswith(sname)]
            ax.plot([r["concurrency"] for r in rs], [r["output_tok_s"] for r in rs], "o-",
                    label=server)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tokens/s")
        ax.set_title(sname)
        ax.legend()
    fig.suptitle(f"bench.serve, {common.device_label(record['machine'])}, "
                 f"{record['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from infer.text import load_tokenizer

    try:
        args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    except ValueError:
        raise common.UsageError(f"--concurrency {args.concurrency!r}: comma-separated "
                                "integers") from None
    modes = [m for m in args.modes.split(",") if m]
    if not args.concurrency or min(args.concurrency) < 1 or any(m not in MODES for m in modes):
        raise common.UsageError("--concurrency needs integers >= 1, --modes a subset of "
                                + ",".join(MODES))
    if args.peer:
        from bench.decode import check_hf_device

        check_hf_device(args.peer_device, flag="--peer-device")  # before any server starts
    record = common.header("serve", args)
    tok = load_tokenizer(args.model)
    with open(args.prompts) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.num_prompts]
    # keep each prompt's last --max-prompt-tokens tokens (as text), so every server gets the same
    prompts = [tok.decode(tok.encode(t, add_special_tokens=False).ids[-args.max_prompt_tokens:])
               for t in texts]
    log_dir = tempfile.mkdtemp(prefix="bench-serve-")
    print(f"server logs: {log_dir}", flush=True)
    runs = []
    slots = max(args.concurrency)
    for mode in modes:
        port = _free_port()
        cmd = [sys.executable, "-m", "infer.serve", "--model", args.model, "--port", str(port),
               "--mode", "ar" if mode == "ar" else "orthrus", "--slots", str(slots),
               "--max-len", str(args.max_len), "--served-model-name", "ours", "--max-queue",
               "1024", "--dtype", args.dtype]
        if mode == "tree":
            cmd += ["--verify", "tree"] + ([] if args.tree_budget is None
                                           else ["--tree-budget", str(args.tree_budget)])
        runs += bench_server(f"ours-{mode}", cmd, port, "ours", prompts, args, tok,
                             os.path.join(log_dir, f"serve-{mode}.log"))
    if args.peer:
        exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable),
                                                           "transformers")
        port = _free_port()
        cmd = [exe, "serve", "--continuous-batching", "--device", args.peer_device,
               "--dtype", args.dtype,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", args.hf_dir]
        runs += bench_server("transformers", cmd, port, args.hf_dir, prompts, args, tok,
                             os.path.join(log_dir, "serve-transformers.log"), top_k=False)
        import transformers
        record.update(transformers=transformers.__version__, peer_device=args.peer_device)
    record["runs"] = runs
    by = {(r["server"], r["setting"], r["concurrency"]): r for r in runs}
    targets = []
    ours, peer = by.get(("ours-ar", "greedy", 16)), by.get(("transformers", "greedy", 16))
    if ours and peer:
        ratio = ours["output_tok_s"] / peer["output_tok_s"]
        targets.append(common.target(
            "AR output tok/s vs transformers serve at concurrency 16 (greedy)", ratio, 5.0,
            f"{ours['output_tok_s']:.1f} vs {peer['output_tok_s']:.1f} tok/s"))
        targets.append(common.target(
            "AR p99 TTFT below the peer's at concurrency 16 (peer / ours)",
            peer["ttft_p99_s"] / ours["ttft_p99_s"], 1.0,
            f"peer {peer['ttft_p99_s']:.3f} s, ours {ours['ttft_p99_s']:.3f} s"))
    else:
        targets.append(common.target("AR vs transformers serve at concurrency 16", None, 5.0,
                                     "not measured (needs --modes with ar, the peer, and 16 in "
                                     "--concurrency)"))
    record["targets"] = targets
    files = common.write_record(args.out_dir, "serve", record, markdown,
                                chart=lambda path: plot(path, record))
    common.print_targets(targets)
    print(f"wrote {', '.join(files.values())}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=paths.default_path(paths.DEMO_MODEL_DIR),
                   help="our model dir")
    p.add_argument("--hf-dir", default=paths.default_path(paths.MICRO_MODEL_DIR),
                   help="HF model dir of the same backbone, served by the peer")
    p.add_argument("--prompts", default=paths.default_path(paths.DEV_PROMPTS))
    p.add_argument("--num-prompts", type=int, default=32, help="requests per configuration")
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="keep the last N tokens of each prompt (default 256)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--max-len", type=int, default=512, help="our --max-len (default 512)")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--modes", default="ar,orthrus",
                   help="our server modes, subset of ar,orthrus,tree (tree: orthrus with "
                        "--verify tree)")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="mode tree: draft nodes per cycle (default K-1)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="skip transformers serve")
    p.add_argument("--peer-device", default="cpu",
                   help="transformers serve --device (default cpu; cuda on a GPU machine)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both servers' --dtype (default float32)")
    p.add_argument("--out-dir", default=common.DEFAULT_OUT_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
