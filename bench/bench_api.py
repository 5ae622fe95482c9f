"""The local API's cost: generation through the agent vs llama-cpp-python directly, then load.

    python bench/bench_api.py --models-dir /tmp/qm [--variant Q4_K_M] [--rounds 3]
                              [--max-tokens 48] [--load-seconds 20] [--skip-load]

Part 1 (overhead): the agent's app runs here under uvicorn on a real loopback
socket, serving one loaded variant; "direct" calls ``create_completion`` on
the very same ``Llama`` object (same weights, context and threads), and both
paths evaluate the prompt from scratch. For each prompt, in
alternating order (API, direct, API, ...) so a noisy machine hurts both alike,
the same chat-templated prompt is generated greedily with the same max_tokens
through ``POST /v1/chat/completions`` (httpx, non-streamed) and through
``Llama.create_completion``. Printed: seconds per generated token each way and
the ratio API / direct (target <= 1.03), median over rounds.

Part 2 (load): a real `quantfleet-agent serve` process; the sustainable rate
is measured first (sequential requests, 1 worker); then open-loop arrivals
at 1x, 2x and 10x that rate for ``--load-seconds`` each. Printed per level:
admitted (200) and rejected (429/503) counts, p50/p95/p99 latency of
admitted requests, other statuses (must be 0) and the agent's RSS before and after (bounded memory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from quantfleet.agent.chat import ChatTemplate
from quantfleet.models.catalog import Catalog

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, step by step.",
    "Describe a busy market in the morning.",
    "List some things people do on a summer holiday and why.",
    "Tell me about the history of bicycles.",
    "Describe how to bake bread at home.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(models_dir: Path, variant: str, queue_size: int, tmp: Path
                ) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = tmp / "agent.toml"
    config.write_text(
        f'[models]\ndir = "{models_dir}"\nactive = "{variant}"\nfallback = ""\nn_ctx = 1024\n'
        f"[budgets]\nmax_tokens_ceiling = 512\n"
        f"[concurrency]\nqueue_size = {queue_size}\ndeadline_s = 120\n")
    agent = Path(sys.executable).parent / "quantfleet-agent"
    proc = subprocess.Popen([str(agent), "serve", "--config", str(config), "--port", str(port),
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 180
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the agent exited during start-up")
        time.sleep(0.2)
    raise SystemExit("the agent did not become ready")


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def overhead(models_dir: Path, variant: str, rounds: int, max_tokens: int) -> None:
    """API (in-process uvicorn on a real socket) vs the same Llama object called directly."""
    import threading

    import uvicorn

    from quantfleet.agent.backends import LoadOptions, load_backend
    from quantfleet.agent.config import parse_config
    from quantfleet.agent.serving.api import create_app
    from quantfleet.agent.serving.routing import ModelSet

    entry = Catalog(models_dir).resolve(variant)
    backend = load_backend(entry.backend, entry.path(models_dir), LoadOptions(n_ctx=1024))
    llm = backend._llm  # type: ignore[attr-defined]  # the very same weights and context
    config = parse_config({"models": {"dir": str(models_dir), "active": variant,
                                      "fallback": "", "n_ctx": 1024}}, "bench")
    app = create_app(config, ModelSet.from_backends(config, {variant: backend}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    template = ChatTemplate(backend.chat_template, **backend.special_tokens)
    http = httpx.Client(timeout=300)
    # Warm both paths once.
    http.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    llm.create_completion("hi", max_tokens=4, temperature=0.0)
    ratios = []
    totals = [0.0, 0, 0.0, 0]
    print(f"\n== overhead: {len(PROMPTS)} prompts x {rounds} rounds, max_tokens={max_tokens}, "
          f"greedy, same Llama object, prompt evaluated from scratch both ways ==")
    print(f"{'round':>5} {'api s':>8} {'api tok':>8} {'direct s':>9} {'direct tok':>10} "
          f"{'api s/tok':>10} {'direct s/tok':>12} {'ratio':>6}")
    for r in range(rounds):
        api_s = direct_s = 0.0
        api_tok = direct_tok = 0
        for i, prompt in enumerate(PROMPTS):
            messages = [{"role": "user", "content": prompt}]
            text = template.render(messages)

            def via_api(messages: list[dict[str, str]] = messages) -> tuple[float, int]:
                t = time.perf_counter()
                # A seed makes the backend reset its cache: no reuse of the other run's prompt.
                resp = http.post(url + "/v1/chat/completions", json={
                    "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                    "seed": 1})
                dt = time.perf_counter() - t
                resp.raise_for_status()
                return dt, int(resp.json()["usage"]["completion_tokens"])

            def direct(text: str = text) -> tuple[float, int]:
                t = time.perf_counter()
                llm.reset()
                out = llm.create_completion(text, max_tokens=max_tokens, temperature=0.0,
                                            top_k=1, repeat_penalty=1.0, seed=1)
                dt = time.perf_counter() - t
                return dt, int(out["usage"]["completion_tokens"])  # type: ignore[index]

            order = (via_api, direct) if (i + r) % 2 == 0 else (direct, via_api)
            for fn in order:
                dt, n = fn()
                if fn is via_api:
                    api_s, api_tok = api_s + dt, api_tok + n
                else:
                    direct_s, direct_tok = direct_s + dt, direct_tok + n
        a, d = api_s / max(1, api_tok), direct_s / max(1, direct_tok)
        ratios.append(a / d)
        totals = [totals[0] + api_s, totals[1] + api_tok, totals[2] + direct_s,
                  totals[3] + direct_tok]
        print(f"{r + 1:>5} {api_s:8.2f} {api_tok:8d} {direct_s:9.2f} {direct_tok:10d} "
              f"{a:10.4f} {d:12.4f} {a / d:6.3f}")
    server.should_exit = True
    thread.join(30)
    backend.close()
    print(f"overhead ratio (API / direct, seconds per generated token, median of {rounds}): "
          f"{statistics.median(ratios):.3f}  (target <= 1.03)")
    pooled = (totals[0] / max(1, totals[1])) / (totals[2] / max(1, totals[3]))
    print(f"pooled over all rounds: {pooled:.3f}")


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


def load(url: str, proc: subprocess.Popen[bytes], seconds: float, max_tokens: int) -> None:
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
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--load-max-tokens", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=4)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    entry = Catalog(args.models_dir).resolve(args.variant)
    print(f"variant {entry.name} ({entry.path(args.models_dir)}), {os.cpu_count()} cores")
    if not args.skip_overhead:
        overhead(args.models_dir, args.variant, args.rounds, args.max_tokens)
    if args.skip_load:
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_agent(args.models_dir, args.variant, args.queue_size, Path(tmp))
        try:
            load(url, proc, args.load_seconds, args.load_max_tokens)
        finally:
            stop_agent(proc)


if __name__ == "__main__":
    main()
