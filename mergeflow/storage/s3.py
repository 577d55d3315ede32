"""S3 object store and byte source (boto3), for any S3 API server.

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``, profiles, …);
the endpoint from an explicit argument, ``MERGEFLOW_S3_ENDPOINT_URL``
(:class:`mergeflow.settings.S3Settings`), or boto3's own
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. Path-style addressing, botocore's
``standard`` retry mode. Reads are ranged GETs: :class:`S3Object` reads a safetensors
header with one GET of the first bytes and each tensor with one GET of its range,
never the whole object. Uploads above ``multipart_threshold`` use multipart upload. Against
a plain-``http://`` endpoint (a local S3-compatible server), where SigV4 already signs every
payload's SHA-256, botocore's extra CRC32 checksum of each upload is off
(``request_checksum_calculation="when_required"``: a second pass over every byte, a fifth of
a 7B-shaped `state fold`'s time against SeaweedFS on 2 cores); HTTPS endpoints keep
botocore's default. Every upload declares its Content-Type, multipart parts included
(:func:`content_type`): an untyped one is gzipped by SeaweedFS when its first bytes
compress, which costs its CPU at about 35 MB/s and no space worth having on float tensors.
Errors a user can fix (no such bucket, access denied, endpoint unreachable) become
:class:`~mergeflow.errors.ConfigError`; a missing or short object read as part of a
checkpoint becomes :class:`~mergeflow.errors.CheckpointError`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from mergeflow.errors import CheckpointChanged, CheckpointError, ConfigError, ServiceUnavailable
from mergeflow.settings import S3Settings
from mergeflow.storage.objects import ObjectInfo
from mergeflow.storage.safetensors_file import truncated_error

MiB = 1 << 20


def s3_settings() -> S3Settings:
    """Current settings from the environment (read on each call: cheap, and tests change env)."""
    return S3Settings()


_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def make_s3_client(endpoint_url: str | None = None, settings: S3Settings | None = None) -> Any:
    """A new boto3 S3 client (thread-safe; reuse it). See the module doc for where settings come from."""

    st = settings or s3_settings()
    session = boto3.session.Session()
    region = st.region or session.region_name or "us-east-1"
    endpoint = endpoint_url or st.endpoint_url

    def build(plain_http: bool) -> Any:  # a plain-http endpoint: payloads SigV4-signed, no CRC
        config = Config(
            request_checksum_calculation="when_required" if plain_http else "when_supported",
            s3={"addressing_style": st.addressing_style},
            retries={"mode": "standard", "max_attempts": st.max_attempts},
            connect_timeout=st.connect_timeout,
            read_timeout=st.read_timeout,
            signature_version="s3v4",
            max_pool_connections=max(10, st.max_concurrency * 2),
        )
        return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    seen = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = build((seen or "").startswith("http://"))
    if client.meta.endpoint_url.startswith("http://") and not (seen or "").startswith("http://"):
        client = build(True)  # an endpoint from the AWS config file
    client.meta.events.register("before-sign.s3.UploadPart", _typed_part)
    return client


def _typed_part(request: Any, **kwargs: Any) -> None:
    """Declare a multipart part's bytes as binary (see :func:`content_type`): UploadPart has no
    ContentType parameter, and SeaweedFS gzips an untyped part whose first bytes compress."""
    request.headers["Content-Type"] = "application/octet-stream"


def shared_s3_client(endpoint_url: str | None = None, settings: S3Settings | None = None) -> Any:
    """A cached client per (endpoint, settings, AWS environment)."""
    st = settings or s3_settings()
    key = (endpoint_url, st, tuple(os.environ.get(k) for k in _ENV_KEYS))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = make_s3_client(endpoint_url, st)
    return client


def _endpoint(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", "") or "AWS")


def _code(e: ClientError) -> str:
    err = e.response.get("Error", {})
    return str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "ExpiredToken",
    "InvalidToken",
}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}


@contextmanager
def s3_errors(client: Any, bucket: str, what: str, key: str | None = None) -> Iterator[None]:
    """Translate boto errors into mergeflow errors with the endpoint, bucket and action named.

    A missing key is re-raised as ``FileNotFoundError`` (as a local store does); callers
    that read checkpoints turn it into :class:`CheckpointError`.
    """
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    try:
        yield
    except ClientError as e:
        code = _code(e)
        if code == "NoSuchBucket":
            raise ConfigError(
                f"S3 bucket {bucket!r} does not exist at {_endpoint(client)} ({what} {where})"
            ) from None
        if code in _DENIED:
            raise ConfigError(
                f"S3 access denied at {_endpoint(client)} ({what} {where}: {code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
            ) from None
        if code in _MISSING_KEY:
            raise FileNotFoundError(f"{where} does not exist") from None
        raise ConfigError(
            f"S3 error at {_endpoint(client)} ({what} {where}): {code}: {e}"
        ) from None
    except (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError) as e:
        raise ServiceUnavailable(
            f"cannot reach the S3 endpoint {_endpoint(client)} ({what} {where}): {e}; "
            "check AWS_ENDPOINT_URL_S3 / MERGEFLOW_S3_ENDPOINT_URL and that the server runs"
        ) from None
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise ConfigError(
            f"no S3 credentials for {where}: {e}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None


def content_type(relpath: str) -> str:
    """The Content-Type an upload declares: JSON and text files by their names, everything else
    (weights) ``application/octet-stream``. Declared, not left to the server: SeaweedFS, the
    embedded store, gzips an untyped upload whose first 128 bytes compress, which float
    tensors often do (a fold's state by about half, at about 35 MB/s of the store's CPU)."""
    if relpath.endswith(".json"):
        return "application/json"
    if relpath.endswith((".txt", ".md", ".jinja")):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.strip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class S3Object:
    """A :class:`~mergeflow.storage.safetensors_file.ByteSource` over one S3 object, read by ranges.

    ``size()`` costs one HEAD (cached), each ``read``/``read_prefix`` one ranged GET, or for a
    range above ``multipart_chunksize`` that many ranged GETs, ``max_concurrency`` at a time.
    After the HEAD, reads pin the object's ETag (``IfMatch``) so a concurrent overwrite
    fails loudly instead of mixing two versions.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        size: int | None = None,
        etag: str | None = None,
        settings: S3Settings | None = None,
    ) -> None:
        st = settings or s3_settings()
        self._part = st.multipart_chunksize
        self._concurrency = st.max_concurrency
        self.client = client
        self.bucket = bucket
        self.key = key
        self.name = f"s3://{bucket}/{key}"
        self._size = size
        self._etag = etag

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            with s3_errors(self.client, self.bucket, what, self.key):
                yield
        except FileNotFoundError:
            raise CheckpointError(self.name, "object does not exist") from None
        except ConfigError as e:
            if "PreconditionFailed" in str(e):
                raise CheckpointChanged(
                    self.name, "object changed while it was being read"
                ) from None
            raise

    def size(self) -> int:
        if self._size is None:
            with self._errors("HEAD"):
                head = self.client.head_object(Bucket=self.bucket, Key=self.key)
            self._size = int(head["ContentLength"])
            self._etag = head.get("ETag")
        return self._size

    def _get(self, first: int, last: int) -> bytes:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.key,
            "Range": f"bytes={first}-{last}",
        }
        if self._etag:
            kwargs["IfMatch"] = self._etag
        with self._errors("GET"):
            resp = self.client.get_object(**kwargs)
            return resp["Body"].read()

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (see :meth:`read_into`)."""
        if length == 0:
            return b""
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; a range above ``multipart_chunksize`` is fetched as
        concurrent ranged GETs, each copied straight to its place."""
        length = len(buf)
        if offset < 0:
            raise ValueError("offset must be non-negative")
        if length == 0:
            return
        part, workers = self._part, self._concurrency
        end = offset + length
        step = part if length > part and workers > 1 else length
        spans = [(a, min(a + step, end)) for a in range(offset, end, step)]

        def fetch(span: tuple[int, int]) -> None:
            a, e = span
            data = self._get(a, e - 1)
            if len(data) != e - a:
                raise truncated_error(self.name, a, e - a, len(data))
            buf[a - offset : e - offset] = data

        if len(spans) == 1:
            fetch(spans[0])
            return
        with ThreadPoolExecutor(min(workers, len(spans)), thread_name_prefix="mergeflow-s3") as ex:
            list(ex.map(fetch, spans))

    def read_prefix(self, length: int) -> bytes:
        """Up to ``length`` first bytes in one GET (fewer if the object is shorter)."""
        if length <= 0:
            return b""
        return self._get(0, length - 1)

    def close(self) -> None:
        """Nothing to release (the client is shared)."""


class S3Store:
    """An :class:`~mergeflow.storage.objects.ObjectStore` rooted at ``s3://bucket/prefix``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any | None = None,
        endpoint_url: str | None = None,
        settings: S3Settings | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or s3_settings()
        self.client = (
            client if client is not None else shared_s3_client(endpoint_url, self.settings)
        )
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @classmethod
    def from_uri(
        cls, uri: str, *, client: Any | None = None, endpoint_url: str | None = None
    ) -> S3Store:
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, client=client, endpoint_url=endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={_endpoint(self.client)!r})"

    def _key(self, relpath: str) -> str:
        if relpath.startswith("/") or any(part in ("..", ".") for part in relpath.split("/")):
            raise ConfigError(f"path {relpath!r} is not a clean relative path under {self.uri}")
        return _join(self.prefix, relpath)

    def _errors(self, what: str, relpath: str = "") -> Any:
        return s3_errors(self.client, self.bucket, what, self._key(relpath) or None)

    def child(self, relpath: str) -> S3Store:
        return S3Store(self.bucket, self._key(relpath), client=self.client, settings=self.settings)

    def byte_source(self, relpath: str) -> S3Object:
        return S3Object(self.client, self.bucket, self._key(relpath), settings=self.settings)

    def read_bytes(self, relpath: str) -> bytes:
        with self._errors("GET", relpath):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(relpath))["Body"].read()

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self._errors("PUT", relpath):
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(relpath),
                Body=data,
                ContentType=content_type(relpath),
            )

    def transfer_config(self) -> TransferConfig:
        st = self.settings
        return TransferConfig(
            multipart_threshold=st.multipart_threshold,
            multipart_chunksize=st.multipart_chunksize,
            max_concurrency=st.max_concurrency,
        )

    def put_file(self, local_path: Path, relpath: str) -> None:
        """Upload a file; multipart above ``multipart_threshold`` (S3 makes it visible atomically)."""
        if not Path(local_path).is_file():
            raise FileNotFoundError(local_path)
        with self._errors("upload", relpath):
            try:
                self.client.upload_file(
                    str(local_path),
                    self.bucket,
                    self._key(relpath),
                    ExtraArgs={"ContentType": content_type(relpath)},
                    Config=self.transfer_config(),
                )
            except Exception as e:  # S3UploadFailedError wraps the ClientError as text
                cause = e.__cause__ or e.__context__
                if isinstance(cause, ClientError | EndpointConnectionError | NoCredentialsError):
                    raise cause from None
                if "NoSuchBucket" in str(e):
                    raise ConfigError(
                        f"S3 bucket {self.bucket!r} does not exist at {_endpoint(self.client)} (upload {self.uri}/{relpath})"
                    ) from None
                raise

    def exists(self, relpath: str) -> bool:
        try:
            with self._errors("HEAD", relpath):
                self.client.head_object(Bucket=self.bucket, Key=self._key(relpath))
        except FileNotFoundError:
            return False
        return True

    def _list_prefix(self, relprefix: str) -> str:
        key = self._key(relprefix.strip("/")) if relprefix.strip("/") else self.prefix
        return key

    def list(self, relprefix: str = "") -> list[ObjectInfo]:
        """Objects under ``relprefix`` (a folder, or one object), sorted by relative path."""
        base = self._list_prefix(relprefix)
        out: list[ObjectInfo] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("LIST", relprefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    key: str = obj["Key"]
                    # Prefix "a" must not match "ab/..": keep the object itself or keys below "a/".
                    if base and key != base and not key.startswith(base + "/"):
                        continue
                    if key.endswith("/"):  # folder markers some tools create
                        continue
                    out.append(
                        ObjectInfo(
                            key[strip:],
                            int(obj["Size"]),
                            str(obj.get("ETag", "")).strip('"'),
                            obj["LastModified"].timestamp(),
                        )
                    )
        out.sort(key=lambda o: o.relpath)
        return out

    def delete_prefix(self, relprefix: str = "") -> None:
        keys = [_join(self.prefix, o.relpath) for o in self.list(relprefix)]
        with self._errors("DELETE", relprefix):
            for i in range(0, len(keys), 1000):
                batch = keys[i : i + 1000]
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
                errors = resp.get("Errors") or []
                if errors:
                    raise ConfigError(
                        f"S3 delete under {self.uri}/{relprefix} failed for {len(errors)} objects, e.g. {errors[0]}"
                    )
