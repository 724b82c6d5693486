"""Load test of ``medcap serve``: batching on against batching off, in the same run.

Starts two servers as subprocesses on 127.0.0.1 with the same model, one batching
(``--max-batch 8 --batch-window-ms 10`` by default) and one not (``--max-batch 1``), then sends a
bounded number of requests from this process at concurrency 1, 8 and 32 (httpx, asyncio), the two
servers taking turns level by level so that drift in the machine's load hits both alike. Prints, per
server and level: errors (must be 0), p50 / p99 latency, throughput and the mean batch size the
server reports; then the throughput ratio batched / unbatched. Stops by itself: a request count per
level and a time limit for the whole run; the servers are killed on the way out.

    python benchmarks/bench_serve.py                       # the built-in tiny model
    python benchmarks/bench_serve.py --checkpoint runs/demo/run/checkpoints/best   # the demo model

Exit code 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int = 8) -> list[bytes]:
    """Radiograph-like PNGs, each a little different (position and size of a bright spot)."""
    out = []
    for i in range(n):
        im = Image.new("L", (224, 224), 10)
        d = ImageDraw.Draw(im)
        d.ellipse((30, 20, 194, 204), fill=100 + 5 * i)
        d.ellipse((60 + 8 * i, 80, 90 + 8 * i, 110), fill=230)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Server:
    """``medcap serve`` in a subprocess (its own process group, so it is killed with its children)."""

    def __init__(self, name: str, model_args: list[str], max_batch: int, window_ms: float, log_dir: Path):
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        cmd = [
            sys.executable, "-m", "medcap", "serve", *model_args,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms),
            "--max-queue", "1024", "--log-level", "warning",
        ]  # fmt: skip
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server {self.name} did not answer /healthz in time; see {self.log_path}")

    def metrics(self) -> dict:
        return httpx.get(self.url + "/v1/metrics", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def _load(
    url: str, concurrency: int, requests: int, images: list[bytes], fields: dict, timeout: float
) -> dict:
    """Send ``requests`` requests, at most ``concurrency`` in flight: the latency of each answered one,
    the errors, and the wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        url + "/v1/captions",
                        files={"files": (f"img{i}.png", images[i % len(images)], "image/png")},
                        data=fields,
                    )
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        return
                    if not r.json()["results"][0]["caption"]:
                        errors.append("empty caption")
                        return
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall": wall, "requests": requests}


def _summarise(rounds: list[dict]) -> dict:
    """p50/p99 over every latency of a level's rounds; throughput = answered / summed wall time."""
    lat = sorted(x for r in rounds for x in r["latencies"])
    errors = [e for r in rounds for e in r["errors"]]
    wall = sum(r["wall"] for r in rounds)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")

    return {
        "requests": sum(r["requests"] for r in rounds),
        "errors": len(errors),
        "error_samples": errors[:3],
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
        "throughput_rps": len(lat) / wall if wall > 0 else 0.0,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model for both servers (default: tiny)")
    src.add_argument("--checkpoint", default=None, help="training checkpoint (the demo model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument(
        "--requests", type=int, default=64, help="requests per level and server (at least the concurrency)"
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="each level is split into rounds, the servers alternating"
    )
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--max-new-tokens", type=int, default=16, help="sent with every request")
    p.add_argument("--time-limit", type=float, default=900.0, help="stop (and fail) after this many seconds")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    model_args = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model or "tiny"]
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    fields = {"max_new_tokens": str(args.max_new_tokens)}
    images = _images()
    started = time.time()
    deadline = started + args.time_limit
    results: dict[str, dict[int, dict]] = {"batched": {}, "unbatched": {}}
    with tempfile.TemporaryDirectory(prefix="medcap-bench-serve-") as tmp:
        servers = {
            "batched": Server("batched", model_args, args.max_batch, args.batch_window_ms, Path(tmp)),
            "unbatched": Server("unbatched", model_args, 1, 0.0, Path(tmp)),
        }
        try:
            for s in servers.values():
                s.wait_ready(min(deadline, time.time() + 600))
            print(f"servers up in {time.time() - started:.1f} s; model {' '.join(model_args)}; "
                  f"batched: max batch {args.max_batch}, window {args.batch_window_ms} ms", flush=True)  # fmt: skip
            for s in servers.values():  # warm-up: first generate() calls are slow
                asyncio.run(_load(s.url, 2, 4, images, fields, timeout=120))
            for c in levels:
                n = max(args.requests, c)
                per_round = max(c, n // args.rounds)
                rounds: dict[str, list[dict]] = {name: [] for name in servers}
                counts: dict[str, tuple[int, int]] = {}
                for name, s in servers.items():
                    m = s.metrics()
                    counts[name] = (m["batches"], m["images"])
                for _ in range(args.rounds):
                    for name, s in servers.items():
                        remaining = deadline - time.time()
                        if remaining <= 0:
                            raise TimeoutError(f"time limit of {args.time_limit:.0f} s reached")
                        rounds[name].append(
                            asyncio.run(
                                asyncio.wait_for(
                                    _load(s.url, c, per_round, images, fields, timeout=remaining), remaining
                                )
                            )
                        )
                for name, s in servers.items():
                    m = s.metrics()
                    batches, imgs = m["batches"] - counts[name][0], m["images"] - counts[name][1]
                    res = _summarise(rounds[name])
                    res["mean_batch"] = imgs / batches if batches else float("nan")
                    results[name][c] = res
                    print(
                        f"{name:>9}  c={c:<3} n={res['requests']:<4} errors={res['errors']}  "
                        f"p50={res['p50_ms']:8.1f} ms  p99={res['p99_ms']:8.1f} ms  "
                        f"{res['throughput_rps']:7.2f} req/s  mean batch {res['mean_batch']:.2f}",
                        flush=True,
                    )
                    for sample in res["error_samples"]:
                        print(f"           error: {sample}")
        finally:
            for s in servers.values():
                s.stop()

    print("\nthroughput ratio, batched / unbatched (same run, same machine):")
    for c in levels:
        b, u = results["batched"].get(c), results["unbatched"].get(c)
        if b and u and u["throughput_rps"] > 0:
            print(f"  concurrency {c:>3}: {b['throughput_rps'] / u['throughput_rps']:.2f}x  "
                  f"(p50 {b['p50_ms']:.0f} vs {u['p50_ms']:.0f} ms)")  # fmt: skip
    total_errors = sum(r["errors"] for per in results.values() for r in per.values())
    print(f"errors: {total_errors}; total time {time.time() - started:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
