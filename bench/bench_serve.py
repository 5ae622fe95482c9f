"""The agent against raw llama-cpp-python and llama-cpp-python's own server, each in a
clean process of its own, interleaved in one run (issue 16: a benchmark that cannot
flatter itself).

    python bench/bench_serve.py --models-dir /tmp/qm [--variant Q4_K_M] [--rounds 3]
                                [--max-tokens 64]

Three processes load the same GGUF (n_ctx 1024, the runtime's default threads):

- **raw**: a bare Python process calling ``Llama.create_chat_completion`` (its
  chat handler, greedy), told what to run over a pipe;
- **agent**: ``quantfleet-agent serve`` (one worker, no fallback, no telemetry);
- **peer**: ``python -m llama_cpp.server`` (skipped when its extra is not installed).

Each prompt goes to every path in turn, the order rotating, non-streamed and
streamed. Printed per path: median seconds per generated token and median time to
first token (streamed; for raw, to the first chunk of ``stream=True``), and the
ratios agent / raw and agent / peer (target: <= 1.03 and <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import free_port, wait_http

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
llm = Llama(model_path=sys.argv[1], n_ctx=1024, verbose=False, seed=0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--variant", default="Q4_K_M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    entry = Catalog(args.models_dir).resolve(args.variant)
    gguf = entry.path(args.models_dir)
    print(f"{entry.name} ({gguf}); load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    procs: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            raw = subprocess.Popen([sys.executable, "-c", RAW_WORKER, str(gguf)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            procs.append(raw)
            assert raw.stdout is not None and raw.stdin is not None
            if raw.stdout.readline().strip() != "ready":
                raise SystemExit("the raw worker did not start")

            cfg = Path(tmp) / "agent.toml"
            cfg.write_text(f'[models]\ndir = "{args.models_dir}"\nactive = "{args.variant}"\n'
                           'fallback = ""\nn_ctx = 1024\n[budgets]\nmax_tokens_ceiling = 512\n'
                           "[concurrency]\ndeadline_s = 300\n")
            aport = free_port()
            agent = subprocess.Popen([str(Path(sys.executable).parent / "quantfleet-agent"),
                                      "serve", "--config", str(cfg), "--port", str(aport),
                                      "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(agent)
            agent_url = f"http://127.0.0.1:{aport}"
            wait_http(agent_url + "/healthz", agent, "the agent")

            paths: dict[str, Any] = {}
            try:
                import llama_cpp.server.app  # noqa: F401  (the peer's extra is installed)

                pport = free_port()
                peer = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model",
                                         str(gguf), "--n_ctx", "1024", "--port", str(pport)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(peer)
                peer_url = f"http://127.0.0.1:{pport}"
                wait_http(peer_url + "/v1/models", peer, "the peer server")
            except ImportError:
                peer_url = None
                print("peer: llama-cpp-python[server] is not installed; skipped")

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
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()


if __name__ == "__main__":
    main()
