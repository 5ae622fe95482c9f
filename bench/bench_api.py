"""The local API's cost: the agent against raw llama-cpp-python and llama-cpp-python's
own server, each in a clean process of its own, at 1, 2 and 4 clients; then load.

    python bench/bench_api.py --models-dir /tmp/qm [--variant Q4_K_M] [--rounds 3]
                              [--max-tokens 64] [--clients 1,2,4] [--load-seconds 20]
                              [--skip-overhead] [--skip-concurrency] [--skip-load]

Part 1 (overhead, one client). Three processes load the same GGUF (n_ctx 1024;
threads per generation: each one's default, or ``--threads N`` on all three),
none of them the benchmark's own:

- **raw**: a bare Python process calling ``Llama.create_chat_completion`` (its
  chat handler, greedy), told what to run over a pipe;
- **agent**: ``quantfleet-agent serve`` (one worker, no fallback, no telemetry);
- **peer**: ``python -m llama_cpp.server`` (skipped when its extra, ``[bench]``,
  is not installed).

Each prompt goes to every path in turn, the order rotating, non-streamed and
streamed. Printed per path: median seconds per generated token and median time to
first token (streamed; for raw, to the first chunk of ``stream=True``), and the
ratios agent / raw and agent / peer (target: <= 1.03 and <= 1.0).

Part 2 (concurrency): the agent with ``workers_per_model`` 1 and 2, and the peer,
each given ``--clients`` closed-loop clients at once (every client sends the
prompts one after the other, non-streamed); the targets take turns at each
client count. Printed: generated tokens per second over all clients, and the
ratios to the peer's at the same count.

Part 3 (load): a real `quantfleet-agent serve` process; the sustainable rate
is measured first (sequential requests, 1 worker); then open-loop arrivals
at 1x, 2x and 10x that rate for ``--load-seconds`` each. Printed per level:
admitted (200) and rejected (429/503) counts, p50/p95/p99 latency of
admitted requests, other statuses (must be 0) and the agent's RSS before and
after (bounded memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import free_port, stop, wait_http

from quantfleet.models.catalog import Catalog

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, step by step.",
    "Describe a busy market in the morning.",
    "List some things people do on a summer holiday and why.",
    "Tell me about the history of bicycles.",
    "Describe how to bake bread at home.",
]

RAW_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
threads = int(sys.argv[2]) or None  # 0: llama-cpp-python's default (half the cores)
llm = Llama(model_path=sys.argv[1], n_ctx=1024, verbose=False, seed=0, n_threads=threads,
            n_threads_batch=threads)
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    msgs = [{"role": "user", "content": job["prompt"]}]
    t0 = time.perf_counter()
    if job["stream"]:
        ttft, n = None, 0
        for chunk in llm.create_chat_completion(msgs, max_tokens=job["max_tokens"],
                                                temperature=0.0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
        out = {"s": time.perf_counter() - t0, "tokens": n, "ttft": ttft}
    else:
        r = llm.create_chat_completion(msgs, max_tokens=job["max_tokens"], temperature=0.0)
        out = {"s": time.perf_counter() - t0, "tokens": r["usage"]["completion_tokens"],
               "ttft": None}
    print(json.dumps(out), flush=True)
"""


def http_run(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int,
             stream: bool) -> dict[str, Any]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": prompt}]}
    t0 = time.perf_counter()
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        return {"s": time.perf_counter() - t0,
                "tokens": r.json()["usage"]["completion_tokens"], "ttft": None}
    ttft, n = None, 0
    with client.stream("POST", url + "/v1/chat/completions",
                       json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
    return {"s": time.perf_counter() - t0, "tokens": n, "ttft": ttft}


def start_agent(models_dir: Path, variant: str, tmp: Path, *, workers: int = 1,
                queue_size: int = 16, name: str = "agent", threads: int = 0
                ) -> tuple[subprocess.Popen[Any], str]:
    """A real agent; ``threads`` 0 keeps its default (all cores)."""
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[models]\ndir = "{models_dir}"\nactive = "{variant}"\nfallback = ""\nn_ctx = 1024\n'
        f"workers_per_model = {workers}\n" + (f"threads = {threads}\n" if threads else "")
        + "[budgets]\nmax_tokens_ceiling = 512\n"
        f"[concurrency]\nqueue_size = {queue_size}\ndeadline_s = 300\n")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "quantfleet-agent"), "serve",
                             "--config", str(config), "--port", str(port),
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, name)
        while httpx.get(url + "/healthz", timeout=2).status_code != 200:
            time.sleep(0.2)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def start_peer(gguf: Path, threads: int = 0) -> tuple[subprocess.Popen[Any], str] | None:
    """llama-cpp-python's server; ``threads`` 0 keeps its default (half the cores)."""
    try:
        import llama_cpp.server.app  # noqa: F401  (the peer's extra is installed)
    except ImportError:
        print("peer: llama-cpp-python[server] is not installed ([bench] extra); skipped")
        return None
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                             "--n_ctx", "1024", "--port", str(port),
                             *(["--n_threads", str(threads), "--n_threads_batch", str(threads)]
                               if threads else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/v1/models", proc, "the peer server")
    except BaseException:
        stop(proc)
        raise
    return proc, url


def overhead(args: argparse.Namespace, gguf: Path) -> None:
    """One client: agent, raw and peer, each in its own clean process, interleaved."""
    procs: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            raw = subprocess.Popen([sys.executable, "-c", RAW_WORKER, str(gguf),
                                    str(args.threads)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            procs.append(raw)
            assert raw.stdout is not None and raw.stdin is not None
            if raw.stdout.readline().strip() != "ready":
                raise SystemExit("the raw worker did not start")

            agent, agent_url = start_agent(args.models_dir, args.variant, Path(tmp),
                                           threads=args.threads)
            procs.append(agent)
            peer = start_peer(gguf, args.threads)
            peer_url = None
            if peer:
                procs.append(peer[0])
                peer_url = peer[1]
            paths: dict[str, Any] = {}
            client = httpx.Client(timeout=600)

            def run_raw(prompt: str, stream: bool) -> dict[str, Any]:
                assert raw.stdin is not None and raw.stdout is not None
                raw.stdin.write(json.dumps({"prompt": prompt, "max_tokens": args.max_tokens,
                                            "stream": stream}) + "\n")
                raw.stdin.flush()
                out: dict[str, Any] = json.loads(raw.stdout.readline())
                return out

            paths["raw"] = run_raw
            paths["agent"] = lambda p, s: http_run(client, agent_url, "default", p,
                                                    args.max_tokens, s)
            if peer_url:
                paths["peer"] = lambda p, s: http_run(client, peer_url, "x", p,
                                                       args.max_tokens, s)
            for fn in paths.values():  # warm every path once
                fn("hi", False)
            results: dict[tuple[str, bool], list[dict[str, Any]]] = {
                (name, s): [] for name in paths for s in (False, True)}
            names = list(paths)
            k = 0
            for _ in range(args.rounds):
                for prompt in PROMPTS:
                    for stream in (False, True):
                        order = names[k % len(names):] + names[:k % len(names)]
                        k += 1
                        for name in order:
                            results[(name, stream)].append(paths[name](prompt, stream))
            print(f"\n{len(PROMPTS)} prompts x {args.rounds} rounds, max_tokens "
                  f"{args.max_tokens}, greedy, one client, order rotating")
            print(f"{'path':<7} {'mode':<7} {'s/token':>9} {'TTFT ms':>9} {'tokens':>7}")
            per_tok: dict[tuple[str, bool], float] = {}
            ttft: dict[tuple[str, bool], float] = {}
            for (name, stream), runs in results.items():
                per_tok[(name, stream)] = statistics.median(
                    r["s"] / max(1, r["tokens"]) for r in runs)
                firsts = [r["ttft"] for r in runs if r["ttft"] is not None]
                ttft[(name, stream)] = statistics.median(firsts) if firsts else float("nan")
                print(f"{name:<7} {'stream' if stream else 'json':<7} "
                      f"{per_tok[(name, stream)]:>9.4f} "
                      f"{ttft[(name, stream)] * 1000:>9.0f} "
                      f"{sum(r['tokens'] for r in runs):>7}")
            for stream in (False, True):
                mode = "stream" if stream else "json"
                line = (f"agent / raw ({mode}): "
                        f"{per_tok[('agent', stream)] / per_tok[('raw', stream)]:.3f}")
                if peer_url:
                    line += (f"   agent / peer ({mode}): "
                             f"{per_tok[('agent', stream)] / per_tok[('peer', stream)]:.3f}")
                print(line)
        finally:
            for proc in procs:
                stop(proc)


def closed_loop(url: str, model: str, clients: int, max_tokens: int, rounds: int
                ) -> tuple[float, int]:
    """``clients`` threads sending every prompt ``rounds`` times each; (seconds, tokens)."""
    tokens = [0] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with httpx.Client(timeout=600) as http:
                for r in range(rounds):
                    for k in range(len(PROMPTS)):
                        prompt = PROMPTS[(i + k + r) % len(PROMPTS)]
                        tokens[i] += http_run(http, url, model, prompt, max_tokens,
                                              False)["tokens"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a client failed: {errors[0]!r}")
    return time.perf_counter() - t0, sum(tokens)


def concurrency(args: argparse.Namespace, gguf: Path, tmp: Path) -> None:
    """Throughput at 1, 2, 4 clients: the agent with 1 and 2 workers, and the peer."""
    procs: list[subprocess.Popen[Any]] = []
    try:
        targets: dict[str, tuple[str, str]] = {}
        for workers in (1, 2):
            proc, url = start_agent(args.models_dir, args.variant, tmp, workers=workers,
                                    threads=args.threads,
                                    name=f"agent-w{workers}")
            procs.append(proc)
            targets[f"agent w{workers}"] = (url, "default")
        peer = start_peer(gguf, args.threads)
        if peer:
            procs.append(peer[0])
            targets["peer"] = (peer[1], "x")
        for url, model in targets.values():  # warm every target once
            closed_loop(url, model, 1, 8, 1)
        counts = [int(c) for c in args.clients.split(",")]
        print(f"\n== concurrency: closed-loop clients, each sending the {len(PROMPTS)} prompts "
              f"x {args.rounds}, max_tokens {args.max_tokens}, non-streamed ==")
        print(f"{'clients':>7} " + " ".join(f"{n + ' tok/s':>14}" for n in targets)
              + "   vs peer")
        for c in counts:
            tps: dict[str, float] = {}
            names = list(targets)
            for name in names[c % len(names):] + names[:c % len(names)]:
                url, model = targets[name]
                seconds, tokens = closed_loop(url, model, c, args.max_tokens, args.rounds)
                tps[name] = tokens / seconds
            ratios = ", ".join(f"{n} {tps[n] / tps['peer']:.2f}" for n in targets
                               if n != "peer" and "peer" in tps)
            print(f"{c:>7} " + " ".join(f"{tps[n]:>14.1f}" for n in targets) + f"   {ratios}")
    finally:
        for proc in procs:
            stop(proc)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def load_level(url: str, rate: float, seconds: float, max_tokens: int) -> dict[str, object]:
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def one(http: httpx.AsyncClient) -> None:
        t = time.perf_counter()
        try:
            r = await http.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": max_tokens})
            code = r.status_code
        except httpx.HTTPError:
            code = -1
        codes[code] = codes.get(code, 0) + 1
        if code == 200:
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        tasks = []
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            tasks.append(asyncio.create_task(one(http)))
            n += 1
            # Poisson arrivals at the given rate, bounded by the run length.
            await asyncio.sleep(random.expovariate(rate))
        await asyncio.gather(*tasks)
    return {"sent": n, "codes": codes, "latencies": latencies}


def load(url: str, proc: subprocess.Popen[Any], seconds: float, max_tokens: int) -> None:
    http = httpx.Client(timeout=300)
    t = time.perf_counter()
    k = 4
    for i in range(k):
        http.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": max_tokens}
        ).raise_for_status()
    service = (time.perf_counter() - t) / k
    sustainable = 1.0 / service
    agent = psutil.Process(proc.pid)
    print(f"\n== load: sustainable rate {sustainable:.2f} req/s (mean service {service:.2f} s, "
          f"max_tokens={max_tokens}, 1 worker), {seconds:.0f} s per level ==")
    print(f"{'load':>5} {'sent':>5} {'admitted':>8} {'rejected':>8} {'other':>6} {'p50 s':>7} "
          f"{'p95 s':>7} {'p99 s':>7} {'RSS MiB before->after':>22}")
    for mult in (1, 2, 10):
        rss0 = agent.memory_info().rss / 2**20
        res = asyncio.run(load_level(url, sustainable * mult, seconds, max_tokens))
        rss1 = agent.memory_info().rss / 2**20
        codes: dict[int, int] = res["codes"]  # type: ignore[assignment]
        lat: list[float] = res["latencies"]  # type: ignore[assignment]
        admitted = codes.get(200, 0)
        rejected = codes.get(429, 0) + codes.get(503, 0)
        other = sum(v for c, v in codes.items() if c not in (200, 429, 503))
        print(f"{mult:>4}x {res['sent']:>5} {admitted:>8} {rejected:>8} {other:>6} "
              f"{pct(lat, 50):7.2f} {pct(lat, 95):7.2f} {pct(lat, 99):7.2f} "
              f"{rss0:10.0f} -> {rss1:.0f}")
    print("agent alive after 10x:", proc.poll() is None,
          "| healthz:", httpx.get(url + "/healthz").status_code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path,
                    default=Path(os.environ.get("QUANTFLEET_MODELS_DIR", "var/models")))
    ap.add_argument("--variant", default="Q4_K_M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per generation on every path (0: each one's default: all "
                         "cores for the agent, half of them for llama-cpp-python)")
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--load-max-tokens", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=4)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    entry = Catalog(args.models_dir).resolve(args.variant)
    gguf = entry.path(args.models_dir)
    cores = os.cpu_count() or 1
    threads = (f"{args.threads} on every path" if args.threads else
               f"defaults (agent {cores}, raw and peer {max(1, cores // 2)})")
    print(f"{entry.name} ({gguf}); load average {os.getloadavg()[0]:.2f} on {cores} CPUs; "
          f"threads per generation: {threads}")
    if not args.skip_overhead:
        overhead(args, gguf)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_concurrency:
            concurrency(args, gguf, Path(tmp))
        if not args.skip_load:
            proc, url = start_agent(args.models_dir, args.variant, Path(tmp),
                                    queue_size=args.queue_size, name="agent-load")
            try:
                load(url, proc, args.load_seconds, args.load_max_tokens)
            finally:
                stop(proc)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
