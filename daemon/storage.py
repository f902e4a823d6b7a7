"""Where revisions go: one small Protocol, a local directory and S3.

A target holds ``rev-<outer>-<inner>/`` folders and the pointer ``LATEST``.
Every object is written whole (atomic rename locally, a single PUT or a
completed multipart upload on S3), so the only ordering the publisher needs is
"files, then the manifest, then LATEST".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from daemon import atomic
from daemon.urls import redact_url

POINTER = "LATEST"
MANIFEST = "metadata.json"
# ASCII digits only: \d also matches other scripts' digits, which int() reads but no validator would.
REVISION_RE = re.compile(r"^rev-([0-9]+)-([0-9]+)$")
_CHUNK = 1 << 20
# The most one S3 PUT may carry; a larger object can only be stored as a multipart upload.
MAX_SINGLE_PUT = 5 << 30
# What get_bytes reads when the caller names no bound: every read has one.
MAX_OBJECT_BYTES = 16 << 20


class StorageError(Exception):
    """A backend operation failed (network, permissions, server down)."""


class TooLarge(StorageError):
    """An object holds more bytes than the reader takes (``size`` None: it did not say how many)."""

    def __init__(self, key: str, size: int | None, limit: int) -> None:
        self.size, self.limit = size, limit
        held = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(f"{key}: {held}, over the {limit} it may take")


def _bounded(chunks: Iterator[bytes], key: str, max_bytes: int) -> Iterator[bytes]:
    """``chunks`` until they pass ``max_bytes``: then TooLarge, and nothing more is read."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            raise TooLarge(key, None, max_bytes)
        yield chunk


def _store(chunks: Iterator[bytes], dest: Path | None) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(dest, "xb")) if dest is not None else None
        for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    return size, h.hexdigest()


def _what(mode: int) -> str:
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    for test, what in kinds:
        if test(mode):
            return what
    return "a special file"


def _not_a_file(mode: int) -> str:
    # A directory reads as a plain read says it, as it always has.
    return os.strerror(errno.EISDIR) if stat.S_ISDIR(mode) else f"{_what(mode)}, not a regular file"


def revision_key(name: str) -> tuple[int, int] | None:
    """(outer, inner) of a revision name, or None if it is not one."""
    m = REVISION_RE.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_key(key: str) -> str:
    """``key`` if it is a plain relative path inside a target; StorageError otherwise. A
    manifest read from a target is untrusted: it must not name ``../../etc/hostname``."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"not a path inside the target: {key[:80]!r}")
    return key


class Storage(Protocol):
    """A published target. Keys are '/'-separated paths relative to the target."""

    def describe(self) -> str:
        """Where this is, for log lines; never carries credentials."""
        ...

    def put_file(self, key: str, src: Path) -> None:
        """Store ``src`` whole under ``key``; ``src`` stays in place (retries reuse it)."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes | None:
        """The object's bytes, or None when it does not exist; TooLarge when it holds more
        than ``max_bytes``, found before reading or, for an object that lied about its size,
        once the read passes ``max_bytes`` (nothing more is read)."""
        ...

    def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
        """Stream the object into ``dest`` (None: only hash it), reading at most ``max_bytes``;
        (size, sha256 hex), None when it does not exist, TooLarge as ``get_bytes``."""
        ...

    def list_folders(self, prefix: str, limit: int) -> list[str]:
        """Names of the folders directly under ``prefix`` (at most ``limit``, sorted)."""
        ...

    def modified(self, key: str) -> float | None:
        """When the object was written (Unix seconds, the storage's own clock); None if absent."""
        ...

    def list_revisions(self) -> list[str]:
        """Revision folder names present, in any order."""
        ...

    def delete_revision(self, name: str) -> None: ...


class LocalStorage:
    """A directory. Files are hard-linked (or copied) in under a temp name, fsynced
    and renamed, so a reader or a SIGKILL never leaves a half-written object."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_file(self, key: str, src: Path) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        try:
            os.unlink(tmp)
            try:
                # Same filesystem (the staging area lives under the target): no copy,
                # and the staged file stays for a retry. The staged file was fsynced.
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, dst)
            atomic.fsync_dir(dst.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic.write_bytes(self._path(key), data)

    def get_bytes(self, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes | None:
        chunks = self._chunks(key, max_bytes)
        return None if chunks is None else b"".join(chunks)

    def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
        chunks = self._chunks(key, max_bytes)
        return None if chunks is None else _store(chunks, dest)

    def _chunks(self, key: str, max_bytes: int) -> Iterator[bytes] | None:
        fd = self._open_regular(key)
        if fd is None:
            return None
        fh = os.fdopen(fd, "rb")  # closed when read to the end, or when dropped unread
        size = os.fstat(fd).st_size
        if size > max_bytes:
            fh.close()
            raise TooLarge(key, size, max_bytes)
        return _bounded(self._read(fh, key), key, max_bytes)

    @staticmethod
    def _read(fh: IO[bytes], key: str) -> Iterator[bytes]:
        with fh:
            while True:
                try:
                    chunk = fh.read(_CHUNK)
                except OSError as exc:
                    raise StorageError(f"read {key}: {exc.strerror or exc}") from None
                if not chunk:
                    return
                yield chunk

    def _open_regular(self, key: str) -> int | None:
        """A descriptor of the regular file at ``key``, or None when there is none. The target
        itself may be a link (the operator's choice); inside it nothing is followed: the
        publisher writes plain files and folders only, and a link in a revision could point
        at a device (endless reads), a pipe (a read that blocks) or a file outside it."""
        parts = check_key(key).split("/")
        try:
            dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"read {key}: {exc.strerror or exc}") from None
        try:
            for part in parts[:-1]:
                st = os.stat(part, dir_fd=dirfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise StorageError(f"read {key}: {part} is {_what(st.st_mode)}, not a folder")
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                os.close(dirfd)
                dirfd = inner
            # Looked at before it is opened: opening a device can act on it.
            st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"read {key}: {_not_a_file(st.st_mode)}")
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:  # no permission, or replaced by a link between the two looks
            raise StorageError(f"read {key}: {exc.strerror or exc}") from None
        finally:
            os.close(dirfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the two looks
            os.close(fd)
            raise StorageError(f"read {key}: not a regular file")
        return fd

    def list_folders(self, prefix: str, limit: int) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir() or base.is_symlink():
            return []
        names = []
        for entry in os.scandir(base):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                names.append(entry.name)
                if len(names) >= limit:
                    break
        return sorted(names)

    def modified(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key), follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None

    def list_revisions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and REVISION_RE.fullmatch(p.name)]

    def delete_revision(self, name: str) -> None:
        shutil.rmtree(self._path(name), ignore_errors=True)


class S3Storage:
    """s3://bucket/prefix through boto3; ``endpoint_url`` for R2 and MinIO.

    Credentials come from the environment only (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN; region from AWS_REGION or
    AWS_DEFAULT_REGION). They are handed to boto3 and never logged or stored.
    """

    def __init__(self, target: str, endpoint_url: str = "", environ: dict[str, str] | None = None,
                 multipart_bytes: int = 64 << 20) -> None:
        """``multipart_bytes``: files of at least this size are uploaded in parts of this size (boto3
        raises a part to S3's 5 MiB minimum, and further when a file would need over 10,000)."""
        if not target.startswith("s3://"):
            raise StorageError(f"not an s3:// target: {target!r}")
        bucket, _, prefix = target[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"no bucket in {target!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        env = dict(os.environ if environ is None else environ)
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise StorageError(
                "S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
            )
        try:
            import boto3  # lazily: only the s3 backend needs it
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config as BotoConfig
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as exc:
            raise StorageError(f"the s3 backend needs boto3: {exc}") from None
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        self._client_error: type[Exception] = ClientError
        # upload_file also raises OSError (reading the staged file, sockets), and so may a
        # body's stream.
        self._put_errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError, OSError)
        # Our publisher retries whole revisions with backoff; boto's own retries
        # are kept short so a dead endpoint fails an attempt in seconds, not minutes.
        self._client: Any = boto3.session.Session(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        ).client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=BotoConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )
        # A threshold at or below the single-PUT limit is what guarantees that every file too large
        # for one PUT (an 8B model's 64 GB optimizer state, a weights shard over 5 GB) goes in parts.
        if not 0 < multipart_bytes <= MAX_SINGLE_PUT:
            raise ValueError(f"multipart_bytes {multipart_bytes} is not in 1..{MAX_SINGLE_PUT}")
        self._transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)

    def describe(self) -> str:
        """Where revisions go, as logs, /status and the bundle show it: without a password."""
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {redact_url(self.endpoint_url)}" if self.endpoint_url else where

    def _key(self, key: str) -> str:
        if key:
            check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, what: str, exc: BaseException) -> StorageError:
        text = str(exc)
        if self.endpoint_url:  # botocore's messages quote the endpoint URL, password and all
            text = text.replace(self.endpoint_url, redact_url(self.endpoint_url))
        return StorageError(f"{what}: {type(exc).__name__}: {text}")

    def _missing(self, exc: BaseException) -> bool:
        if not isinstance(exc, self._client_error):
            return False
        response: dict[str, Any] = getattr(exc, "response", {})
        code = str(response.get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def put_file(self, key: str, src: Path) -> None:
        # upload_file takes every file of at least the threshold in parts (a completed multipart
        # upload is one whole object, as a PUT is): this is how files over 5 GB are stored.
        try:
            self._client.upload_file(str(src), self.bucket, self._key(key), Config=self._transfer)
        except self._put_errors as exc:
            raise self._wrap(f"put {key}", exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        # One PUT: the publisher sends only manifests and pointers (a few KB) through here.
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except self._errors as exc:
            raise self._wrap(f"put {key}", exc) from None

    def get_bytes(self, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes | None:
        chunks = self._chunks(key, max_bytes)
        return None if chunks is None else b"".join(chunks)

    def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
        chunks = self._chunks(key, max_bytes)
        return None if chunks is None else _store(chunks, dest)

    def _chunks(self, key: str, max_bytes: int) -> Iterator[bytes] | None:
        """The object as a stream: the GET returns once the headers are in, and the body is read
        a chunk at a time, so an object over ``max_bytes`` is refused by its Content-Length
        before any of it is read, and one whose length lied is cut off at ``max_bytes``."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise self._wrap(f"get {key}", exc) from None
        body = response["Body"]
        length = response.get("ContentLength")
        if isinstance(length, int) and length > max_bytes:
            body.close()
            raise TooLarge(key, length, max_bytes)
        return _bounded(self._read(body, key), key, max_bytes)

    def _read(self, body: Any, key: str) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(_CHUNK)
        except self._put_errors as exc:
            raise self._wrap(f"read {key}", exc) from None
        finally:
            body.close()

    def list_folders(self, prefix: str, limit: int) -> list[str]:
        base = self._key(prefix) + "/" if prefix else self._key("")
        names: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/", PaginationConfig={"MaxItems": limit}
            )
            for page in pages:
                names += [cp["Prefix"][len(base) :].strip("/") for cp in page.get("CommonPrefixes", [])]
        except self._errors as exc:
            raise self._wrap(f"list {prefix}", exc) from None
        return sorted(n for n in names[:limit] if n)

    def modified(self, key: str) -> float | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise self._wrap(f"stat {key}", exc) from None
        return float(head["LastModified"].timestamp())

    def list_revisions(self) -> list[str]:
        base = self._key("")
        names = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    name = cp["Prefix"][len(base) :].strip("/")
                    if REVISION_RE.fullmatch(name):
                        names.append(name)
        except self._errors as exc:
            raise self._wrap("list revisions", exc) from None
        return names

    def delete_revision(self, name: str) -> None:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(name) + "/"
            )
            for page in pages:
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        except self._errors as exc:
            raise self._wrap(f"delete {name}", exc) from None


def open_storage(target: str, endpoint_url: str = "") -> Storage:
    """s3://bucket/prefix gives S3Storage; anything else is a local directory."""
    if target.startswith("s3://"):
        return S3Storage(target, endpoint_url)
    return LocalStorage(Path(target))
