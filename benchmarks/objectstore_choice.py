"""Which local S3 server backs the embedded stack: SeaweedFS (``weed``) or moto's server?

Runs SeaweedFS as ``weed mini`` and as ``weed server`` (same components) and
``moto_server`` side by side on 127.0.0.1 and prints, for each:

- start-up: spawn until an authenticated ListBuckets succeeds and a bucket takes a write;
- upload: a ~200 MB object through boto3 multipart (8 MiB parts);
- ranged reads deep into it: 1 MiB GETs at random offsets in the last 50 MB (median
  latency), one 32 MiB GET at offset 160 MB (throughput), and 1 MiB GETs at the start
  for contrast;
- memory: resident set when idle after start, and the peak (VmHWM);
- persistence: stop, start again on the same data, is the object still there?

Usage: ``python benchmarks/objectstore_choice.py [--size-mb 200] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from mergeflow.services.process import free_port_block, port_free
from mergeflow.services.s3_server import (
    EMBEDDED_CREDENTIALS,
    PORTS_PER_SERVER,
    ObjectStoreServer,
    is_healthy,
)

MiB = 1 << 20
BUCKET = "bench"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=EMBEDDED_CREDENTIALS.access_key,
        aws_secret_access_key=EMBEDDED_CREDENTIALS.secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"}, retries={"mode": "standard"}, read_timeout=300
        ),
    )


class Weed:
    def __init__(self, data_dir: Path, mode: str) -> None:
        self.name = f"SeaweedFS (weed {mode})"
        self.server = ObjectStoreServer(
            data_dir / f"weed-{mode}", port=free_port_block(PORTS_PER_SERVER), mode=mode
        )
        self.endpoint = self.server.endpoint_url

    def start(self) -> int:
        self.server.start()
        self.server.ensure_bucket(BUCKET)
        assert self.server.pid is not None
        return self.server.pid

    def stop(self) -> None:
        self.server.stop(grace=30.0)


class Moto:
    name = "moto_server"

    def __init__(self, data_dir: Path) -> None:
        self.port = next(
            p for p in range(free_port_block(PORTS_PER_SERVER), 65000) if port_free("127.0.0.1", p)
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        exe = Path(sys.executable).parent / "moto_server"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not is_healthy(self.endpoint, timeout=1.0, embedded=False):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"moto_server did not start; see {self.log}")
            time.sleep(0.05)
        c = client(self.endpoint)
        try:
            c.create_bucket(Bucket=BUCKET)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        c.put_object(Bucket=BUCKET, Key=".probe", Body=b"ok")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None


def ranged(c: Any, key: str, offset: int, length: int) -> float:
    t = time.perf_counter()
    body = c.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={offset}-{offset + length - 1}")[
        "Body"
    ].read()
    dt = time.perf_counter() - t
    assert len(body) == length
    return dt


def bench(server: Weed | Moto, payload: Path, size: int, reads: int) -> dict[str, Any]:
    out: dict[str, Any] = {"server": server.name}
    t = time.perf_counter()
    pid = server.start()
    out["start_s"] = time.perf_counter() - t
    time.sleep(1.0)
    out["rss_idle_mib"] = rss_mib(pid)
    c = client(server.endpoint)
    t = time.perf_counter()
    c.upload_file(
        str(payload),
        BUCKET,
        "big.bin",
        Config=TransferConfig(
            multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4
        ),
    )
    out["upload_s"] = time.perf_counter() - t
    out["upload_mb_s"] = size / MiB / out["upload_s"]
    rng = random.Random(0)
    ranged(c, "big.bin", size - MiB, MiB)  # warm the connection
    deep = [
        ranged(c, "big.bin", rng.randrange(size - 50 * MiB, size - MiB), MiB) for _ in range(reads)
    ]
    head = [ranged(c, "big.bin", rng.randrange(0, 8 * MiB), MiB) for _ in range(reads)]
    out["deep_1mib_ms_median"] = statistics.median(deep) * 1000
    out["head_1mib_ms_median"] = statistics.median(head) * 1000
    big_off = min(160 * MiB, size - 32 * MiB)
    out["deep_32mib_mb_s"] = 32 / ranged(c, "big.bin", big_off, 32 * MiB)
    out["rss_peak_mib"] = rss_mib(pid, "VmHWM")
    t = time.perf_counter()
    server.stop()
    out["stop_s"] = time.perf_counter() - t
    t = time.perf_counter()
    server.start()
    out["restart_s"] = time.perf_counter() - t
    try:
        out["survives_restart"] = (
            client(server.endpoint).head_object(Bucket=BUCKET, Key="big.bin")["ContentLength"]
            == size
        )
    except Exception:
        out["survives_restart"] = False
    server.stop()
    return out


ROWS = [
    ("start_s", "start-up until writable (s)", "{:.2f}"),
    ("rss_idle_mib", "RSS idle after start (MiB)", "{:.0f}"),
    ("upload_s", "upload, multipart 8 MiB parts (s)", "{:.2f}"),
    ("upload_mb_s", "upload throughput (MiB/s)", "{:.0f}"),
    ("head_1mib_ms_median", "1 MiB ranged GET near start, median (ms)", "{:.1f}"),
    ("deep_1mib_ms_median", "1 MiB ranged GET in last 50 MB, median (ms)", "{:.1f}"),
    ("deep_32mib_mb_s", "32 MiB ranged GET at 160 MB (MiB/s)", "{:.0f}"),
    ("rss_peak_mib", "RSS peak (MiB)", "{:.0f}"),
    ("stop_s", "stop (s)", "{:.2f}"),
    ("restart_s", "restart on same data (s)", "{:.2f}"),
    ("survives_restart", "object survives restart", "{}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--reads", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    size = args.size_mb * MiB
    results = []
    with tempfile.TemporaryDirectory(prefix="mergeflow-osbench-") as tmp:
        work = Path(tmp)
        payload = work / "payload.bin"
        with open(payload, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(MiB))
        servers: list[Weed | Moto] = [Weed(work, "mini"), Weed(work, "server"), Moto(work)]
        for server in servers:
            try:
                results.append(bench(server, payload, size, args.reads))
            finally:
                server.stop()
    width = max(len(r[1]) for r in ROWS)
    print(f"object size {args.size_mb} MiB, {args.reads} reads per point, {os.cpu_count()} CPUs")
    print(f"{'':{width}}  " + "  ".join(f"{r['server']:>23}" for r in results))
    for key, label, fmt in ROWS:
        print(f"{label:{width}}  " + "  ".join(f"{fmt.format(r[key]):>23}" for r in results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
