"""Flood test of ``medcap serve``: good requests alone, then the same good requests during a flood of
hostile ones, against one server with its default limits, in the same run.

Starts ``medcap serve`` (the built-in tiny model unless told otherwise) in a subprocess on 127.0.0.1
with the default ServeLimits, then:

1. baseline: ``--good-clients`` clients send good requests (one 512 x 512 JPEG each, ``max_new_tokens``
   16) back to back for ``--baseline`` seconds;
2. flood: the same good clients for ``--duration`` seconds while ``--attackers`` clients send, in
   turn: a request of 8 blank 6000 x 6000 PNGs (35 KB each, under every limit: the costliest legal
   request), a deflated DICOM of 1 GiB (1 MB), an RLE 16-bit colour DICOM of 6000 x 6000 (3.4 MB),
   a progressive JPEG of 20,000 scans (340 KB), a 16-bit TIFF of 6000 x 6000 (107 KB), a JPEG-in-DICOM
   whose frame is garbage, ``do_sample`` with temperature 1e-38, and an upload cut off half way;
   and ``--slow-connections`` connections that send one header byte a second and never finish.

Prints and writes (``--json``): the good requests' p50 / p99 latency without and during the flood and
their ratio, errors by status code for good and hostile requests (5xx counted apart), the server's
peak resident memory (VmHWM of its process) and its own counters. Goals (issue 18): no 5xx, peak RSS
under 4 GB with the default limits, good p99 within 3x of the baseline. The machine is whatever it
is: on a shared box, other jobs' load is in both phases alike, but say so next to the numbers.

    python benchmarks/bench_hostile.py --json benchmarks/results/bench_hostile_cpu.json

Exit code 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the hostile inputs live with the tests
from tests.hostile_inputs import (  # noqa: E402
    blank_png,
    deflated_dicom,
    jpeg_in_dicom,
    progressive_jpeg_scan_bomb,
    rle_colour_dicom,
    tiff_16bit,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _good_image() -> bytes:
    """A radiograph-like 512 x 512 JPEG (ROCOv2's images are a few hundred pixels a side)."""
    im = Image.new("L", (512, 512), 10)
    d = ImageDraw.Draw(im)
    d.ellipse((60, 40, 450, 470), fill=110)
    d.ellipse((180, 200, 260, 280), fill=230)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Server:
    """``medcap serve`` in a subprocess (its own process group), default limits."""

    def __init__(self, model_args: list[str], log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "serve.log"
        cmd = [
            sys.executable,
            "-m",
            "medcap",
            "serve",
            *model_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the server did not start")

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory of the server process."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _attacks() -> list[tuple[str, dict]]:
    """The hostile requests, each ``(kind, request)``; ``request`` holds httpx ``files``/``data`` or
    ``cut`` (an upload to cut off half way)."""
    small = blank_png(64, 64, colour=True)
    big = blank_png(6000, 6000)
    return [
        ("8x 6000x6000 PNG", {"files": [("files", (f"big{i}.png", big)) for i in range(8)]}),
        ("deflated DICOM 1 GiB", {"files": [("files", ("deflated.dcm", deflated_dicom()))]}),
        ("RLE 16-bit RGB DICOM", {"files": [("files", ("rle.dcm", rle_colour_dicom()))]}),
        (
            "JPEG 20,000 scans",
            {"files": [("files", ("scans.jpg", progressive_jpeg_scan_bomb(2048, 20_000, True)))]},
        ),
        ("16-bit TIFF 6000x6000", {"files": [("files", ("t16.tif", tiff_16bit(6000, 6000)))]}),
        (
            "garbage JPEG in DICOM",
            {"files": [("files", ("bad.dcm", jpeg_in_dicom(b"\xff\xd8" + b"junk" * 40, 64, 64)))]},
        ),
        (
            "temperature 1e-38",
            {"files": [("files", ("a.png", small))], "data": {"do_sample": "true", "temperature": "1e-38"}},
        ),
        ("upload cut off", {"cut": blank_png(1500, 1500, colour=True)}),
    ]


async def _cut_upload(host: str, port: int, data: bytes) -> str:
    """Send the headers and half the body of a caption request, then hang up."""
    boundary = "hostileBoundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    _, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"POST /v1/captions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[: len(body) // 2]
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    return "cut"


async def _slow_connection(host: str, port: int, stop: float, closed: Counter) -> None:
    """Opens a connection, sends a header byte a second and never finishes; reopens when closed."""
    while time.time() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\n")
            while time.time() < stop:
                await asyncio.sleep(1.0)
                writer.write(b"X")
                await writer.drain()
                if reader.at_eof():
                    break
                try:
                    if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                        break
                except asyncio.TimeoutError:
                    pass
            closed["closed by the server" if time.time() < stop else "open at the end"] += 1
            writer.close()
        except (ConnectionError, OSError):
            closed["connection error"] += 1
            await asyncio.sleep(0.5)


async def _good_clients(url: str, clients: int, seconds: float, image: bytes) -> dict:
    latencies: list[float] = []
    codes: Counter = Counter()
    stop = time.time() + seconds
    async with httpx.AsyncClient(timeout=300) as client:

        async def one_client(k: int) -> None:
            i = 0
            while time.time() < stop:
                i += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        url + "/v1/captions",
                        files={"files": (f"good{k}_{i}.jpg", image, "image/jpeg")},
                        data={"max_new_tokens": "16"},
                    )
                    codes[str(r.status_code)] += 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                except httpx.HTTPError as e:
                    codes[type(e).__name__] += 1

        await asyncio.gather(*(one_client(k) for k in range(clients)))
    return {"latencies": latencies, "codes": dict(codes)}


async def _attackers(url: str, attackers: int, seconds: float, slow: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    attacks = _attacks()
    by_kind: dict[str, Counter] = {kind: Counter() for kind, _ in attacks}
    slow_closed: Counter = Counter()
    stop = time.time() + seconds
    async with httpx.AsyncClient(timeout=300) as client:

        async def attacker(k: int) -> None:
            i = k
            while time.time() < stop:
                kind, req = attacks[i % len(attacks)]
                i += 1
                try:
                    if "cut" in req:
                        by_kind[kind][await _cut_upload(host, int(port), req["cut"])] += 1
                    else:
                        r = await client.post(url + "/v1/captions", **req)
                        by_kind[kind][str(r.status_code)] += 1
                except (httpx.HTTPError, OSError) as e:
                    by_kind[kind][type(e).__name__] += 1

        tasks = [attacker(k) for k in range(attackers)]
        tasks += [_slow_connection(host, int(port), stop, slow_closed) for _ in range(slow)]
        await asyncio.gather(*tasks)
    return {"by_kind": {k: dict(v) for k, v in by_kind.items()}, "slow_connections": dict(slow_closed)}


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] * 1000 if s else float("nan")


def _summary(run: dict) -> dict:
    lat = run["latencies"]
    return {
        "answered": len(lat),
        "codes": run["codes"],
        "p50_ms": round(_pct(lat, 50), 1),
        "p99_ms": round(_pct(lat, 99), 1),
        "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model to serve (default: tiny)")
    src.add_argument("--checkpoint", default=None, help="training checkpoint to serve")
    p.add_argument("--baseline", type=float, default=30.0, help="seconds of good requests alone")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of flood")
    p.add_argument("--good-clients", type=int, default=2)
    p.add_argument("--attackers", type=int, default=6, help="clients sending hostile requests back to back")
    p.add_argument("--slow-connections", type=int, default=32, help="connections that never finish headers")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    model_args = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model or "tiny"]
    image = _good_image()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medcap-bench-hostile-") as tmp:
        server = Server(model_args, Path(tmp))
        try:
            server.wait_ready(600)
            asyncio.run(_good_clients(server.url, 1, 3.0, image))  # warm-up: first generate() calls are slow
            idle_mb = server.memory_mb()
            print(f"server up; model {' '.join(model_args)}; RSS {idle_mb['VmRSS']:.0f} MB", flush=True)
            base = _summary(asyncio.run(_good_clients(server.url, args.good_clients, args.baseline, image)))
            print(f"baseline: {base}", flush=True)

            async def flood() -> tuple[dict, dict]:
                good, bad = await asyncio.gather(
                    _good_clients(server.url, args.good_clients, args.duration, image),
                    _attackers(server.url, args.attackers, args.duration, args.slow_connections),
                )
                return good, bad

            good_run, hostile = asyncio.run(flood())
            during = _summary(good_run)
            print(f"during the flood: {during}", flush=True)
            time.sleep(1.0)
            memory = server.memory_mb()
            metrics = httpx.get(server.url + "/v1/metrics", timeout=30).json()
            alive = httpx.get(server.url + "/healthz", timeout=30).status_code == 200
        finally:
            server.stop()
            log_tail = server.log_path.read_text(errors="replace").splitlines()[-40:]

    codes: Counter = Counter()
    for counts in [base["codes"], during["codes"], *hostile["by_kind"].values()]:
        codes.update(counts)
    server_errors = {c: n for c, n in codes.items() if c.isdigit() and int(c) >= 500}
    ratio = during["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "args": vars(args),
        "good_baseline": base,
        "good_during_flood": during,
        "good_p99_ratio": round(ratio, 2),
        "hostile_by_kind": hostile["by_kind"],
        "slow_connections": hostile["slow_connections"],
        "codes_all": dict(codes),
        "server_5xx": server_errors,
        "server_peak_rss_mb": round(memory["VmHWM"], 1),
        "server_rss_idle_mb": round(idle_mb["VmRSS"], 1),
        "server_metrics": metrics,
        "server_alive_after": alive,
        "seconds": round(time.time() - started, 1),
    }
    goals = {
        "no 5xx": not server_errors,
        "peak RSS under 4 GB": memory["VmHWM"] < 4096,
        "good p99 within 3x": ratio <= 3.0,
        "server alive": alive,
    }
    result["goals"] = goals
    print(json.dumps({k: result[k] for k in ("hostile_by_kind", "slow_connections", "server_5xx")}, indent=1))
    print(
        f"good p99: {base['p99_ms']:.0f} ms alone, {during['p99_ms']:.0f} ms during the flood ({ratio:.2f}x); "
        f"peak RSS {memory['VmHWM']:.0f} MB (idle {idle_mb['VmRSS']:.0f} MB); 5xx: {sum(server_errors.values())}"
    )
    for goal, ok in goals.items():
        print(f"  {'ok  ' if ok else 'MISS'} {goal}")
    if not all(goals.values()):
        print("server log (last lines):\n  " + "\n  ".join(log_tail))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
