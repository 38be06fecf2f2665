"""Where a shard folder lives: a local path or an object-store URL (`s3://bucket/prefix`), and the few reads made there.

A local path stays a `pathlib.Path`; an `s3://` URL becomes an `ObjectPath`, which joins names like a Path
(`folder / "manifest.json"`) and prints as its URL. The small files of a folder (manifest, answers, index files,
sample json through the index) are read here with boto3, which honours the standard AWS settings: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (or a profile), AWS_REGION, and AWS_ENDPOINT_URL for an S3-compatible server (MinIO, Ceph,
moto). The tars themselves are read by the loaders: DALI opens `s3://` itself (its readers link the AWS C++ SDK,
which reads the same variables), and the PyTorch loader streams them through webdataset's `pipe:` scheme running
`python -m data_pipeline.shards.storage cat URL` (`pipe_url`), so no AWS command line tool is needed.

Only `s3://` is supported: it is the one remote scheme DALI's readers accept (DALI 2.4.0). Every failure is a
one-line `StorageError` naming the URL and what to do.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import BadInputError

SCHEMES = ("s3",)
CHUNK = 1 << 20  # bytes per read when streaming an object
RANGE_THREADS = (
    16  # concurrent ranged reads: one request per sample json would otherwise be one round trip each
)


class StorageError(BadInputError, ValueError):
    """An object or bucket that cannot be read; one line naming the URL."""


class MissingObject(StorageError):
    """The object (or, from head_bucket, the bucket) does not exist."""


class _PastEnd(StorageError):
    """A range that starts at or past the end of the object."""


@dataclass(frozen=True)
class ObjectPath:
    """An object (or a folder-like prefix) in object storage: `s3://bucket/key`, no trailing slash."""

    url: str

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def bucket(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[0]

    @property
    def key(self) -> str:
        rest = self.url.split("://", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else ""


Location = Path | ObjectPath


def is_remote(where: str | Path | ObjectPath) -> bool:
    """Whether `where` is a URL with a scheme (s3://...), rather than a local path."""
    return isinstance(where, ObjectPath) or (isinstance(where, str) and "://" in where)


def location(where: str | Path | ObjectPath) -> Location:
    """A local path as `Path`, an `s3://bucket/prefix` URL as `ObjectPath`; any other scheme is a StorageError."""
    if isinstance(where, ObjectPath | Path):
        return where
    if "://" not in where:
        return Path(where)
    scheme, rest = where.split("://", 1)
    if scheme == "file":
        return Path(rest)
    if scheme not in SCHEMES:
        raise StorageError(
            f"{where}: the {scheme}:// scheme is not supported; a shard folder is a local path or s3://bucket/prefix "
            "(copy it to local disk or to an S3-compatible store)"
        )
    if not rest.split("/", 1)[0]:
        raise StorageError(f"{where}: no bucket name (expected s3://bucket/prefix)")
    return ObjectPath(f"{scheme}://{rest.rstrip('/')}")


def require_local(where: str | Path, what: str) -> Path:
    """`where` as a Path, or a one-line StorageError for a URL: `what` works on local folders only."""
    if is_remote(where):
        raise StorageError(
            f"{where}: {what} reads local folders only: copy the folder to local disk first "
            "(e.g. aws s3 sync URL DIR) and pass DIR"
        )
    return Path(where)


# -- the S3 client (boto3) -------------------------------------------------------------------------------------------
_clients: dict[tuple[int, str | None], Any] = {}


def _client() -> Any:
    """One client per process and endpoint (a client must not cross a fork: DataLoader workers build their own)."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL") or None)
    if key not in _clients:
        try:
            # boto3 and botocore (about 0.2 s to import) are imported for s3:// folders only, here and below: local
            # folders and --help never load them.
            import boto3
        except ImportError:
            raise StorageError(
                "reading s3:// needs boto3, which is not installed (pip install -e . installs the pinned one)"
            ) from None
        # boto3 reads AWS_ENDPOINT_URL itself (1.28+); passing it keeps older versions on the same server as DALI.
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=key[1])
    return _clients[key]


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _failure(obj: ObjectPath, exc: Exception) -> StorageError:
    """botocore's exception as one line naming the URL and what to check."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return StorageError(f"{obj}: no such bucket '{obj.bucket}' at {_endpoint()}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return MissingObject(f"{obj}: no such object at {_endpoint()}")
        if code == "InvalidRange":
            return _PastEnd(f"{obj}: range past the end")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"{obj}: access denied ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        return StorageError(f"{obj}: {code or 'error'} from {_endpoint()}")
    if isinstance(exc, bce.NoCredentialsError):
        return StorageError(
            f"{obj}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
        )
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError | bce.ReadTimeoutError):
        return StorageError(f"{obj}: cannot reach {_endpoint()}: check AWS_ENDPOINT_URL and the network")
    return StorageError(f"{obj}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _call(obj: ObjectPath, method: str, **kw: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(_client(), method)(Bucket=obj.bucket, **kw)
    except (BotoCoreError, ClientError) as exc:
        raise _failure(obj, exc) from None


# -- reads -------------------------------------------------------------------------------------------------------------
def exists(where: Location) -> bool:
    """Whether the file (object) exists; a missing bucket is a StorageError, not False."""
    if isinstance(where, Path):
        return where.is_file()
    try:
        _call(where, "head_object", Key=where.key)
    except MissingObject:
        # A HEAD answers 404 without a body for a missing bucket too: ask about the bucket to say which.
        try:
            _call(where, "head_bucket")
        except MissingObject:
            raise StorageError(f"{where}: no such bucket '{where.bucket}' at {_endpoint()}") from None
        return False
    return True


def size(where: Location) -> int:
    if isinstance(where, Path):
        return where.stat().st_size
    return int(_call(where, "head_object", Key=where.key)["ContentLength"])


def read_bytes(where: Location, offset: int = 0, length: int | None = None) -> bytes:
    """Bytes [offset, offset + length) of a file (to its end without `length`); short when the file is."""
    if isinstance(where, Path):
        with open(where, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)
    if length == 0:
        return b""
    span = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
    try:
        body = _call(where, "get_object", Key=where.key, **({"Range": span} if offset or length else {}))
    except _PastEnd:  # the file is shorter than the range's start, as a local read past the end gives b""
        return b""
    return body["Body"].read()


def read_text(where: Location) -> str:
    return read_bytes(where).decode("utf-8")


def read_ranges(where: Location, ranges: Sequence[tuple[int, int]]) -> Iterator[bytes]:
    """The bytes of each (offset, length) in order; remote ranges are fetched RANGE_THREADS at a time."""
    if isinstance(where, Path):
        with open(where, "rb") as f:
            for offset, length in ranges:
                f.seek(offset)
                yield f.read(length)
        return
    pool = ThreadPoolExecutor(RANGE_THREADS)
    try:
        yield from pool.map(lambda r: read_bytes(where, r[0], r[1]), ranges)
    finally:  # a reader that stops early (an error, a closed generator) leaves no requests queued
        pool.shutdown(wait=True, cancel_futures=True)


def listing(folder: ObjectPath) -> dict[str, int]:
    """name -> size of the objects directly under a prefix (one paginated listing instead of a request per file)."""
    prefix = f"{folder.key}/" if folder.key else ""
    out: dict[str, int] = {}
    token: dict[str, str] = {}
    while True:
        page = _call(folder, "list_objects_v2", Prefix=prefix, Delimiter="/", **token)
        for item in page.get("Contents", ()):
            out[item["Key"][len(prefix) :]] = int(item["Size"])
        if not page.get("IsTruncated"):
            return out
        token = {"ContinuationToken": page["NextContinuationToken"]}


def pipe_url(url: str) -> str:
    """A webdataset `pipe:` URL streaming `url` to stdout through this module (no AWS command line tool needed)."""
    return f"pipe:{shlex.quote(sys.executable)} -m data_pipeline.shards.storage cat {shlex.quote(url)}"


def cat(url: str) -> int:
    """Stream an object to stdout; a reader that stops early (webdataset closing the pipe) is not an error."""
    obj = location(url)
    if not isinstance(obj, ObjectPath):
        raise StorageError(f"{url}: not an s3:// URL")
    body = _call(obj, "get_object", Key=obj.key)["Body"]
    out, sent = sys.stdout.buffer, 0
    try:
        while block := body.read(CHUNK):
            out.write(block)
            sent += len(block)
        out.flush()
    except BrokenPipeError:
        # Python ignores SIGPIPE: the closed pipe arrives here. Point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as exc:  # the connection broke mid-object (botocore/urllib3 errors): one line
        raise StorageError(f"{url}: the download failed after {sent} bytes ({_first_line(exc)})") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "cat":
        print("usage: python -m data_pipeline.shards.storage cat s3://bucket/key", file=sys.stderr)
        return 2
    try:
        return cat(args[1])
    except StorageError as exc:
        print(f"data_pipeline.shards.storage: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
