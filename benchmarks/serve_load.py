"""Bounded load test of `dgemma serve` on loopback: throughput and latency percentiles per concurrency level.

    python benchmarks/serve_load.py --model DIR                  # starts a server on a free loopback port
    python benchmarks/serve_load.py --url http://127.0.0.1:8000  # or drives one that is already running

Each level sends a fixed number of streaming completions (bounded in count and time) with fixed seeds and
`max_tokens`, and reports: requests/s, completion tokens/s, time to first committed canvas (TTFC) and end-to-end
latency percentiles. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, steps: int | None):
    body = {"model": model, "prompt": f"Request {i}: tell me about diffusion.", "max_tokens": max_tokens,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    if steps:
        body["max_denoising_steps"] = steps
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, tokens


async def level(url: str, model: str, conc: int, n: int, max_tokens: int, steps: int | None, timeout: float):
    sem = asyncio.Semaphore(conc)
    limits = httpx.Limits(max_connections=conc + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def run(i):
            async with sem:
                return await one(client, url, model, i, max_tokens, steps)

        t0 = time.perf_counter()
        res = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(n))), timeout)
        wall = time.perf_counter() - t0
    ttfc = [r[0] for r in res]
    lat = [r[1] for r in res]
    toks = sum(r[2] for r in res)
    return {"concurrency": conc, "requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": toks / wall,
            "completion_tokens": toks, "ttfc_p50_ms": 1e3 * pct(ttfc, .5), "ttfc_p90_ms": 1e3 * pct(ttfc, .9),
            "lat_p50_ms": 1e3 * pct(lat, .5), "lat_p90_ms": 1e3 * pct(lat, .9), "lat_p99_ms": 1e3 * pct(lat, .99),
            "lat_mean_ms": 1e3 * statistics.fmean(lat)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgemma", "serve", "--model", model_dir, "--port", str(port),
                             "--max-num-seqs", str(max_num_seqs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy within 120 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory: start `dgemma serve` on a free loopback port")
    src.add_argument("--url", help="base URL of a running server on loopback")
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels (default 1,4,8,16)")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 × concurrency, ≥ 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="max_denoising_steps per canvas (default: checkpoint)")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on each level in seconds")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    proc = None
    if args.model:
        proc, url = start_server(args.model, max(levels))
    else:
        url = args.url.rstrip("/")
        host = urlparse(url).hostname or ""
        if not (host == "localhost" or host.startswith("127.") or host == "::1"):
            raise SystemExit("refusing a non-loopback target: this load test only drives local servers")
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        rows = []
        for c in levels:
            n = args.requests or max(8, 2 * c)
            rows.append(asyncio.run(level(url, model, c, n, args.max_tokens, args.steps, args.timeout)))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        print(json.dumps({"url": url, "max_tokens": args.max_tokens, "steps": args.steps, "levels": rows}, indent=2))
    else:
        print(f"max_tokens={args.max_tokens} steps={args.steps or 'checkpoint'}")
        print(f"{'conc':>4} {'reqs':>4} {'req/s':>7} {'tok/s':>8} {'TTFC p50':>9} {'TTFC p90':>9} "
              f"{'lat p50':>9} {'lat p90':>9} {'lat p99':>9}  (ms)")
        for r in rows:
            print(f"{r['concurrency']:>4} {r['requests']:>4} {r['req_per_s']:>7.2f} {r['tok_per_s']:>8.1f} "
                  f"{r['ttfc_p50_ms']:>9.0f} {r['ttfc_p90_ms']:>9.0f} {r['lat_p50_ms']:>9.0f} "
                  f"{r['lat_p90_ms']:>9.0f} {r['lat_p99_ms']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
