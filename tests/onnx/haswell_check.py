"""Teacher-forced logits of .onnx variants against reference logits, as one small process.

Meant to run under ``qemu-x86_64 -cpu Haswell`` (AVX2 and FMA, no AVX-512, no
VNNI), where ONNX Runtime's MLAS picks its kernels by CPUID and so takes the
AVX2 paths a Haswell or an AVX2-only AMD EPYC takes. It imports only numpy and
onnxruntime (emulated start-up is slow) and talks to the ONNX Runtime session
directly: under qemu-user ``/proc/cpuinfo`` is still the host's, so the
backend's load-time CPU check would judge the host, not the emulated CPU.

    python tests/onnx/haswell_check.py --tokens ids.npy --save-logits ref/ fp32.onnx
    qemu-x86_64 -cpu Haswell .venv/bin/python tests/onnx/haswell_check.py \\
        --tokens ids.npy --reference fp32=ref/fp32.npy --threads 1 int8.onnx int4.onnx

Prints one JSON object per model: seconds to load and to run, and per
reference the same-top-token rate, mean and p99 KLD(reference || model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def teacher_forced(sess: Any, tokens: np.ndarray) -> np.ndarray:
    """Logits ``(len(tokens), vocab)`` from an empty KV cache, every position kept."""
    cfg = json.loads(sess.get_modelmeta().custom_metadata_map["quantfleet.config"])
    empty = np.zeros((1, cfg["n_head_kv"], 0, cfg["head_dim"]), dtype=np.float32)
    feeds = {"input_ids": tokens.astype(np.int64)[None, :],
             "logits_to_keep": np.asarray([len(tokens)], dtype=np.int64)}
    for i in range(cfg["n_layer"]):
        feeds[f"past_key_values.{i}.key"] = empty
        feeds[f"past_key_values.{i}.value"] = empty
    logits: np.ndarray = np.asarray(sess.run(["logits"], feeds)[0][0], dtype=np.float32)
    return logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def compare(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Same-top-token rate, mean and p99 of KLD(ref || test) over positions."""
    lr, lt = _log_softmax(ref), _log_softmax(test)
    kld = (np.exp(lr) * (lr - lt)).sum(axis=-1)
    return {"same_top": float((ref.argmax(-1) == test.argmax(-1)).mean()),
            "mean_kld": float(kld.mean()), "p99_kld": float(np.percentile(kld, 99))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, required=True, help="int64 .npy of token ids")
    ap.add_argument("--reference", action="append", default=[], metavar="NAME=FILE.npy",
                    help="reference logits (len(tokens), vocab); repeatable")
    ap.add_argument("--save-logits", type=Path, default=None, metavar="DIR",
                    help="also write each model's logits to DIR/<file stem>.npy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("models", nargs="+", type=Path)
    args = ap.parse_args(argv)
    tokens = np.load(args.tokens)
    refs = {}
    for item in args.reference:
        name, sep, file = item.partition("=")
        if not sep:
            ap.error(f"--reference {item!r}: expected NAME=FILE.npy")
        refs[name] = np.load(file)
        if refs[name].shape[0] != len(tokens):
            ap.error(f"--reference {item!r}: {refs[name].shape[0]} rows for {len(tokens)} tokens")
    for path in args.models:
        started = time.perf_counter()
        sess = session(path, args.threads)
        loaded = time.perf_counter()
        logits = teacher_forced(sess, tokens)
        done = time.perf_counter()
        del sess
        if args.save_logits is not None:
            args.save_logits.mkdir(parents=True, exist_ok=True)
            np.save(args.save_logits / f"{path.stem}.npy", logits)
        out: dict[str, Any] = {"model": str(path), "tokens": len(tokens),
                               "load_s": round(loaded - started, 2),
                               "run_s": round(done - loaded, 2)}
        out.update({name: compare(ref, logits) for name, ref in refs.items()})
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
