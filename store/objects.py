"""One interface over object storage: `file://` directories and `s3://` buckets.

A store is rooted at a URI (`file:///abs/dir`, a plain local path, or `s3://bucket/prefix`);
keys are POSIX paths relative to that root and can never escape it. URIs are the root plus the
key: `uri_for("a b.png")` under `s3://bkt/x` is `s3://bkt/x/a b.png`. An S3 key is the object's key
as it is; a `file://` key is the file's path with each name percent-encoded only where a key cannot
hold it (bytes that are not UTF-8, backslash, and '%' itself; see store/names.py), so every file a
filesystem allows is addressable.

boto3 is imported only when an s3:// store first talks to the server. S3 clients are
created lazily, once per process and configuration, and are never pickled: a pickled store
carries only its URI and options, so Ray can ship it to another process and it reconnects there.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import mimetypes
import os
import re
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from patchaudit.errors import ObjectNotFound, StoreError
from patchaudit.store.names import (
    SKIP_BAD_KEY,
    SKIP_BROKEN_SYMLINK,
    SKIP_EXTENSION,
    SKIP_NOT_A_FILE,
    SKIP_SYMLINK_DIR,
    SKIP_SYMLINK_OUTSIDE,
    decode_key,
    encode_name,
)

log = logging.getLogger(__name__)

SkipCallback = Callable[[str, str], None]  # (key, reason) of an entry a listing leaves out


def _no_skip(key: str, reason: str) -> None:
    pass


_TMP_SUFFIX = ".tmp"
# Temp names of in-flight FileStore writes: ".<name>.<12 hex>.tmp" (never listed).
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_SCHEME_LIKE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_RETRY_MODES = ("standard", "adaptive")
_ADDRESSING_STYLES = ("auto", "path", "virtual")
_S3_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AuthorizationHeaderMalformed",
        "403",
    }
)


@dataclass(frozen=True)
class ObjectInfo:
    """One object: `key` relative to the store root, `etag` without quotes, full `uri`."""

    key: str
    size: int
    etag: str
    uri: str


# ---------------------------------------------------------------- keys and prefixes


def check_key(key: object) -> str:
    """Return `key` if it is a safe relative POSIX key, else raise StoreError saying why."""
    if not isinstance(key, str):
        raise StoreError(f"object key must be a str, got {type(key).__name__}")
    if not key:
        raise StoreError("object key is empty; expected a relative path such as 'images/0001.png'")
    if "\x00" in key:
        raise StoreError(f"object key {key!r} contains a NUL character")
    if "\\" in key:
        raise StoreError(f"object key {key!r} contains a backslash; use '/' as the separator")
    if key.startswith("/"):
        raise StoreError(f"object key {key!r} is absolute; keys are relative to the store root")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"object key {key!r} is not valid UTF-8") from None
    for part in key.split("/"):
        if part == "..":
            raise StoreError(f"object key {key!r} contains '..'; keys cannot leave the store root")
        if part in ("", "."):
            raise StoreError(
                f"object key {key!r} has an empty or '.' component; use single '/' separators and no trailing '/'"
            )
    return key


def _check_prefix(prefix: object) -> str:
    """A listing prefix: '' or a key, optionally ending in '/' (string-prefix semantics)."""
    if not isinstance(prefix, str):
        raise StoreError(f"prefix must be a str, got {type(prefix).__name__}")
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _check_extensions(extensions: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if extensions is None:
        return None
    exts = (extensions,) if isinstance(extensions, str) else tuple(extensions)
    for ext in exts:
        if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
            raise StoreError(f"extension {ext!r} is invalid; expected strings like '.png', '.jpg'")
    return tuple(e.lower() for e in exts)


def _check_page_size(page_size: int | None) -> None:
    if page_size is not None and (
        isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000
    ):
        raise StoreError(f"page_size must be an int in 1..1000 or None, got {page_size!r}")


def _strip_slash(prefix: Any) -> Any:
    """A child prefix may end in one '/'; check_key validates the rest."""
    return prefix[:-1] if isinstance(prefix, str) and prefix.endswith("/") else prefix


def _join(root: str, key: str) -> str:
    return f"{root}/{key}" if root and key else root or key


# ---------------------------------------------------------------- the interface


class ObjectStore(abc.ABC):
    """A flat key -> bytes namespace rooted at `uri`."""

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The root URI of this store (no trailing '/')."""

    @abc.abstractmethod
    def list(
        self,
        prefix: str = "",
        extensions: str | Iterable[str] | None = None,
        page_size: int | None = None,
        on_skip: SkipCallback | None = None,
    ) -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, recursively, sorted by key.

        `extensions` (e.g. ('.png', '.jpg')) filters case-insensitively. `page_size` is the
        S3 page size (1..1000); file stores accept and ignore it. `on_skip(key, reason)` is
        called for each entry under the prefix that is not listed (reasons: store.names.SKIP_*).
        """

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Metadata of one object; ObjectNotFound if it does not exist."""

    @abc.abstractmethod
    def open_read(self, key: str) -> IO[bytes]:
        """A streaming binary reader; the caller closes it."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Write `data` atomically: readers see the old object or the new one, never a part."""

    @abc.abstractmethod
    def write_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        """Upload a local file, atomically in the same sense as `write_bytes`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error (retries are safe)."""

    @abc.abstractmethod
    def child(self, prefix: str) -> ObjectStore:
        """A store rooted at `prefix` under this one."""

    def uri_for(self, key: str) -> str:
        """The full URI of `key`."""
        return f"{self.uri}/{check_key(key)}"

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _check_data(data: object, uri: str) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StoreError(f"data for {uri} must be bytes-like, got {type(data).__name__}")


# ---------------------------------------------------------------- file://


class FileStore(ObjectStore):
    """A local directory. Writes go to a temp name in the same directory, then os.replace.

    Symlinks are followed only while they stay inside the root: reads through a link that
    resolves outside it raise StoreError; listing skips such entries with a warning and does
    not descend into symlinked directories.
    """

    def __init__(self, root: str | os.PathLike[str]):
        root = os.fspath(root)
        if not root or "\x00" in root:
            raise StoreError(f"invalid local store root {root!r}")
        self._root = os.path.normpath(os.path.abspath(root))

    @property
    def root(self) -> str:
        return self._root

    @property
    def uri(self) -> str:
        return "file://" + ("" if self._root == "/" else self._root)

    def _path(self, key: str) -> str:
        """Local path of `key`, refusing keys and symlinks that resolve outside the root.

        A key is a relative path without '..' (check_key), so unless a name below the root is a
        symlink its real path is the root's real path joined with the key: inside the root. That is
        what one lstat per name shows (a key of one name: one system call); only when a name is a
        link are the root and the path resolved in full (realpath) and compared.
        """
        parts = decode_key(check_key(key))
        path = os.path.join(self._root, *parts)
        if not self._link_below_root(parts):
            return path
        real_root = os.path.realpath(self._root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise StoreError(
                f"{SKIP_SYMLINK_OUTSIDE}: {self.uri_for(key)} resolves to {real}, outside the store root "
                f"{real_root}; keys must stay inside the root"
            )
        return path

    def _link_below_root(self, parts: list[str]) -> bool:
        """True when a name of the key's path below the root is (or may be) a symlink.

        A name that does not exist ends the walk: nothing below it exists either, and realpath
        would append the rest as it is. Any other error: resolve in full to be sure.
        """
        path = self._root
        for name in parts:
            path = os.path.join(path, name)
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return False
            except OSError:
                return True
            if stat.S_ISLNK(mode):
                return True
        return False

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}", self.uri_for(key))

    def list(
        self,
        prefix: str = "",
        extensions: str | Iterable[str] | None = None,
        page_size: int | None = None,
        on_skip: SkipCallback | None = None,
    ) -> Iterator[ObjectInfo]:
        prefix = _check_prefix(prefix)
        exts = _check_extensions(extensions)
        _check_page_size(page_size)
        # A missing root lists as empty, like an S3 prefix with no objects under it.
        if os.path.exists(self._root) and not os.path.isdir(self._root):
            raise StoreError(f"store root {self.uri} is a file, not a directory")
        return self._list(prefix, exts, on_skip or _no_skip)

    def _list(self, prefix: str, exts: tuple[str, ...] | None, on_skip: SkipCallback) -> Iterator[ObjectInfo]:
        real_root = os.path.realpath(self._root).rstrip("/") + "/"
        start = prefix.rpartition("/")[0]  # deepest directory the prefix names
        if start:
            self._path(start)  # refuses a prefix that leads through a symlink out of the root
        yield from self._walk(start, prefix, exts, real_root, on_skip)

    def _walk(
        self, rel_dir: str, prefix: str, exts: tuple[str, ...] | None, real_root: str, on_skip: SkipCallback
    ) -> Iterator[ObjectInfo]:
        """Objects under `rel_dir` in key order, as they are found: a directory's entries are sorted
        with each subdirectory named `name/` (all its keys start so), which makes the depth-first walk
        yield keys in global sorted order. Memory holds one directory's entries per level, not the
        listing."""
        abs_dir = os.path.join(self._root, *decode_key(rel_dir)) if rel_dir else self._root
        try:
            it = os.scandir(abs_dir)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StoreError(f"cannot list {_join(self.uri, rel_dir)}: {e}") from e
        entries: list[tuple[str, str, os.DirEntry | None]] = []  # (sort key, key, file entry or None for a dir)
        with it:
            for entry in it:
                key = _join(rel_dir, encode_name(entry.name))
                if entry.is_dir(follow_symlinks=False):
                    if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                        entries.append((key + "/", key, None))
                    continue
                if not key.startswith(prefix) or _TMP_RE.match(entry.name):
                    continue
                entries.append((key, key, entry))
        entries.sort(key=lambda e: e[0])
        for _, key, file in entries:
            if file is None:
                yield from self._walk(key, prefix, exts, real_root, on_skip)
                continue
            if exts is not None and not key.lower().endswith(exts):
                on_skip(key, SKIP_EXTENSION)
                continue
            info = self._list_entry(file, key, real_root, on_skip)
            if info is not None:
                yield info

    def _list_entry(self, entry: os.DirEntry, key: str, real_root: str, on_skip: SkipCallback) -> ObjectInfo | None:
        try:
            check_key(key)
        except StoreError as e:
            log.warning("skipping %s/%s: %s", self.uri, key, e)
            on_skip(key, SKIP_BAD_KEY)
            return None
        link = entry.is_symlink()
        if link and not os.path.realpath(entry.path).startswith(real_root):
            log.warning("skipping %s: symlink resolves outside the store root", self.uri_for(key))
            on_skip(key, SKIP_SYMLINK_OUTSIDE)
            return None
        try:
            if not entry.is_file(follow_symlinks=True):
                if link and not os.path.exists(entry.path):
                    on_skip(key, SKIP_BROKEN_SYMLINK)
                else:
                    on_skip(key, SKIP_SYMLINK_DIR if link and entry.is_dir(follow_symlinks=True) else SKIP_NOT_A_FILE)
                return None
            return self._info(key, entry.stat(follow_symlinks=True))
        except FileNotFoundError:  # removed (or a dangling link) while listing
            if link:
                on_skip(key, SKIP_BROKEN_SYMLINK)
            return None
        except OSError as e:
            raise StoreError(f"cannot stat {self.uri_for(key)}: {e}") from e

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
        except OSError as e:
            raise StoreError(f"cannot stat {self.uri_for(key)}: {e}") from e
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"{self.uri_for(key)} is not a file")
        return self._info(key, st)

    def open_read(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
        except IsADirectoryError:
            raise ObjectNotFound(f"{self.uri_for(key)} is a directory, not an object") from None
        except OSError as e:
            raise StoreError(f"cannot open {self.uri_for(key)}: {e}") from e

    @contextlib.contextmanager
    def _atomic(self, key: str) -> Iterator[IO[bytes]]:
        """Yield a temp file next to `key`'s path; on success fsync it and rename it over `key`."""
        path = self._path(key)
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
        try:
            os.makedirs(parent, exist_ok=True)
            # os.open with 0o666 keeps the usual umask-derived mode (mkstemp would force 0o600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise StoreError(f"cannot write {self.uri_for(key)}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise StoreError(f"cannot write {self.uri_for(key)}: {e}") from e
            raise

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        _check_data(data, self.uri_for(key))
        with self._atomic(key) as f:
            f.write(data)
        return self.head(key)

    def write_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        local_path = os.fspath(local_path)
        try:
            src = open(local_path, "rb")
        except OSError as e:
            raise StoreError(f"cannot read local file {local_path!r} to upload: {e}") from e
        with src, self._atomic(key) as f:
            shutil.copyfileobj(src, f, 1 << 20)
        return self.head(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot delete {self.uri_for(key)}: {e}") from e

    def child(self, prefix: str) -> FileStore:
        # _path also refuses a child root that is a symlink leading outside this root.
        return FileStore(self._path(_strip_slash(prefix)))

    def __eq__(self, other: object) -> bool:
        return type(other) is FileStore and other._root == self._root

    def __hash__(self) -> int:
        return hash((FileStore, self._root))


# ---------------------------------------------------------------- s3://


class _ClientCache:
    """This process's boto3 clients, one per (store options, AWS_* environment).

    Creating a client parses botocore's data files (~0.3 s), so stores that Ray unpickles
    per task, and child stores, reuse one. Clients are thread-safe; after a fork the child
    starts empty (a client's connection pool must not be shared across processes).
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple, Any] = {}

    def get(self, options: dict[str, Any], make: Any) -> Any:
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        key = (tuple(sorted(options.items())), env)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = make()
            return client


_CLIENTS = _ClientCache()


SORT_RUN = 250_000  # objects sorted in memory at once; longer listings spill sorted runs to disk


class _Found(list):
    """Objects as listed; once SORT_RUN are held, they are sorted and spilled to a local Parquet
    file (a run), so a listing of any length holds at most SORT_RUN objects in memory."""

    def __init__(self, run_size: int | None = None) -> None:
        super().__init__()
        self.run_size = run_size or SORT_RUN
        self.runs: list[str] = []

    def append(self, info: ObjectInfo) -> None:
        super().append(info)
        if len(self) >= self.run_size:
            self.runs.append(_spill(sorted(self, key=lambda i: i.key)))
            self.clear()


def _spill(infos: list[ObjectInfo]) -> str:
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    fd, path = tempfile.mkstemp(prefix="patchaudit-sort-", suffix=".parquet")
    os.close(fd)
    table = pa.table(
        {
            "key": [i.key for i in infos],
            "size": pa.array([i.size for i in infos], pa.int64()),
            "etag": [i.etag for i in infos],
            "uri": [i.uri for i in infos],
        }
    )
    pq.write_table(table, path, row_group_size=16_384)
    return path


def _read_run(path: str) -> Iterator[ObjectInfo]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            cols = f.read_row_group(g).to_pydict()
            yield from (ObjectInfo(*t) for t in zip(cols["key"], cols["size"], cols["etag"], cols["uri"]))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def sorted_by_key(found: list[ObjectInfo]) -> Iterator[ObjectInfo]:
    """`found`'s objects in key order: sorted in memory, or, when it spilled sorted runs (`_Found`),
    merged from them one row group per run at a time."""
    import heapq

    found.sort(key=lambda i: i.key)
    runs = getattr(found, "runs", [])
    if not runs:
        yield from found
        return
    try:
        yield from heapq.merge(*(_read_run(p) for p in runs), iter(found), key=lambda i: i.key)
    finally:
        for p in runs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


class S3Store(ObjectStore):
    """An S3 (or S3-compatible) bucket prefix.

    Endpoint, region and credentials come from the standard AWS settings (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) unless given here. Throttling and
    5xx responses are retried by botocore (`retry_mode`, `max_attempts` = total attempts).
    `addressing_style='path'` suits S3-compatible servers (SeaweedFS, MinIO).

    Explicit credentials passed here travel with the store when it is pickled; prefer the
    environment or instance credentials on a cluster.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile_name: str | None = None,
        addressing_style: str | None = None,
        retry_mode: str = "standard",
        max_attempts: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 32,
    ):
        self._bucket, self._prefix = _parse_s3_uri(uri)
        if addressing_style is not None and addressing_style not in _ADDRESSING_STYLES:
            raise StoreError(f"addressing_style {addressing_style!r} is invalid; use one of {_ADDRESSING_STYLES}")
        if retry_mode not in _RETRY_MODES:
            raise StoreError(f"retry_mode {retry_mode!r} is invalid; use one of {_RETRY_MODES}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise StoreError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise StoreError(
                "pass aws_access_key_id and aws_secret_access_key together (or neither, to use "
                "the standard AWS settings)"
            )
        self._options: dict[str, Any] = dict(
            endpoint_url=endpoint_url,
            region_name=region_name,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            profile_name=profile_name,
            addressing_style=addressing_style,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
        )

    # -- pickling: ship URI + options, never the client
    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "options": dict(self._options)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], **state["options"])  # type: ignore[misc]

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def uri(self) -> str:
        return f"s3://{_join(self._bucket, self._prefix)}"

    def _key(self, key: str) -> str:
        return _join(self._prefix, check_key(key))

    def _client(self) -> Any:
        return _CLIENTS.get(self._options, self._make_client)

    def _make_client(self) -> Any:
        import boto3  # lazy: only s3:// users pay for it
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        o = self._options
        cfg: dict[str, Any] = dict(
            retries={"mode": o["retry_mode"], "total_max_attempts": o["max_attempts"]},
            connect_timeout=o["connect_timeout"],
            read_timeout=o["read_timeout"],
            max_pool_connections=o["max_pool_connections"],
        )
        if o["addressing_style"]:
            cfg["s3"] = {"addressing_style": o["addressing_style"]}
        try:
            session = boto3.session.Session(
                aws_access_key_id=o["aws_access_key_id"],
                aws_secret_access_key=o["aws_secret_access_key"],
                aws_session_token=o["aws_session_token"],
                region_name=o["region_name"],
                profile_name=o["profile_name"],
            )
            return session.client("s3", endpoint_url=o["endpoint_url"], config=Config(**cfg))
        except (BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot create an S3 client for {self.uri}: {e}") from e

    @contextlib.contextmanager
    def _errors(self, action: str, uri: str) -> Iterator[None]:
        """Translate boto errors into ObjectNotFound / StoreError naming `uri`."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            translated = self._translate(e, action, uri)
            if translated is e:
                raise
            raise translated from e

    def _translate(self, e: Exception, action: str, uri: str) -> Exception:
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bx

        if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, bx.ClientError):
            e = e.__context__
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{uri} does not exist")
            if code == "NoSuchBucket":
                return ObjectNotFound(f"bucket {self._bucket!r} does not exist ({action} {uri})")
            if code in _S3_ACCESS_CODES or status == 403:
                return StoreError(
                    f"access denied while trying to {action} {uri} ({code}): check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE), the endpoint "
                    "and the bucket policy"
                )
            msg = err.get("Message", "")
            return StoreError(f"S3 {action} {uri} failed: {code} (HTTP {status}) {msg}".rstrip())
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreError(
                f"no usable AWS credentials to {action} {uri}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass credentials to S3Store ({e})"
            )
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            return StoreError(f"cannot reach the S3 endpoint to {action} {uri} (retried): {e}")
        if isinstance(e, (bx.BotoCoreError, S3UploadFailedError)):
            return StoreError(f"S3 {action} {uri} failed: {e}")
        return e

    def _info(self, key: str, size: int, etag: str) -> ObjectInfo:
        return ObjectInfo(key, int(size), etag.strip('"'), self.uri_for(key))

    def list(
        self,
        prefix: str = "",
        extensions: str | Iterable[str] | None = None,
        page_size: int | None = None,
        on_skip: SkipCallback | None = None,
    ) -> Iterator[ObjectInfo]:
        prefix = _check_prefix(prefix)
        exts = _check_extensions(extensions)
        _check_page_size(page_size)
        return self._list(prefix, exts, page_size, on_skip or _no_skip)

    def _list(self, prefix: str, exts: tuple[str, ...] | None, page_size: int | None, on_skip: SkipCallback):
        root = self._prefix + "/" if self._prefix else ""
        pagination = {"PageSize": page_size} if page_size else {}
        found = _Found()
        with self._errors("list", _join(self.uri, prefix)):
            pages = (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self._bucket, Prefix=root + prefix, PaginationConfig=pagination)
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(root) :]
                    if key.endswith("/"):
                        continue  # directory markers
                    if exts is not None and not key.lower().endswith(exts):
                        on_skip(key, SKIP_EXTENSION)
                        continue
                    try:
                        check_key(key)
                    except StoreError as e:
                        log.warning("skipping s3://%s/%s: %s", self._bucket, obj["Key"], e)
                        on_skip(key, SKIP_BAD_KEY)
                        continue
                    found.append(self._info(key, obj["Size"], obj["ETag"]))
        # AWS returns UTF-8 byte order (== str order) but S3-compatible servers need not:
        # SeaweedFS lists 'a/0.png' before 'a.png'. Sort here so every backend agrees.
        yield from sorted_by_key(found)

    def head(self, key: str) -> ObjectInfo:
        with self._errors("head", self.uri_for(key)):
            r = self._client().head_object(Bucket=self._bucket, Key=self._key(key))
        return self._info(key, r["ContentLength"], r["ETag"])

    def open_read(self, key: str) -> IO[bytes]:
        """A streaming reader over the GET's StreamingBody (see `_S3Reader`)."""
        with self._errors("read", self.uri_for(key)):
            body = self._client().get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
        return cast(IO[bytes], _S3Reader(body, lambda: self._errors("read", self.uri_for(key))))

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        _check_data(data, self.uri_for(key))
        with self._errors("write", self.uri_for(key)):
            # One PUT: the object appears whole or not at all. The content type lets an S3 static
            # website serve a report's index.html as a page (and its heatmaps as images).
            ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
            r = self._client().put_object(Bucket=self._bucket, Key=self._key(key), Body=bytes(data), ContentType=ctype)
        return self._info(key, len(data), r["ETag"])

    def write_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        """Managed upload (multipart above 8 MiB); S3 shows the object only once complete."""
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise StoreError(f"cannot upload {local_path!r}: not an existing local file")
        with self._errors("write", self.uri_for(key)):
            self._client().upload_file(local_path, self._bucket, self._key(key))
        return self.head(key)

    def delete(self, key: str) -> None:
        with self._errors("delete", self.uri_for(key)):
            self._client().delete_object(Bucket=self._bucket, Key=self._key(key))

    def child(self, prefix: str) -> S3Store:
        return S3Store(f"{self.uri}/{check_key(_strip_slash(prefix))}", **self._options)

    def __eq__(self, other: object) -> bool:
        return type(other) is S3Store and (other.uri, other._options) == (self.uri, self._options)

    def __hash__(self) -> int:
        return hash((S3Store, self.uri))


class _S3Reader(io.RawIOBase):
    """A botocore StreamingBody as a plain binary file object.

    StreamingBody's own `with` yields the raw urllib3 stream, which skips botocore's
    content-length check; here `with` yields the reader itself, and errors while
    streaming become StoreError like every other S3 failure.
    """

    def __init__(self, body: Any, errors: Any):
        self._body = body
        self._errors = errors

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with self._errors():
            return self._body.read(None if size is None or size < 0 else size)

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _parse_s3_uri(uri: object) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.lower().startswith("s3://"):
        raise StoreError(f"expected an s3://bucket[/prefix] URI, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StoreError(
            f"invalid bucket name {bucket!r} in {uri!r}: 3-63 characters of lowercase letters, "
            "digits, '.', '-' (or '_'), starting and ending with a letter or digit"
        )
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    if prefix:
        check_key(prefix)
    return bucket, prefix


# ---------------------------------------------------------------- URIs


def _parse_file_uri(uri: str) -> str:
    rest = uri[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise StoreError(f"file URI {uri!r} must be absolute (file:///abs/dir); pass a relative path without a scheme")
    return rest


def open_store(uri: str, **options: Any) -> ObjectStore:
    """A store rooted at `uri`: s3://bucket/prefix, file:///abs/dir, or a plain local path.

    `options` are S3Store keyword arguments (endpoint_url, addressing_style, ...).
    """
    if not isinstance(uri, str) or not uri:
        raise StoreError(f"store URI must be a non-empty string, got {uri!r}")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if not scheme and _SCHEME_LIKE_RE.match(uri):
        raise StoreError(
            f"{uri!r} looks like a malformed URI; use s3://bucket/prefix, file:///abs/dir, "
            "or write a local path containing ':' as ./path"
        )
    if scheme == "s3":
        return S3Store(uri, **options)
    if scheme not in ("", "file"):
        raise StoreError(f"unsupported URI scheme {scheme!r} in {uri!r}; use s3://, file:// or a local path")
    if options:
        raise StoreError(f"options {sorted(options)} apply only to s3:// stores, not {uri!r}")
    return FileStore(_parse_file_uri(uri) if scheme == "file" else uri)


def resolve(uri: str, **options: Any) -> tuple[ObjectStore, str]:
    """Split a full object URI into (store rooted at its parent, key)."""
    if not isinstance(uri, str) or not uri or uri.endswith("/"):
        raise StoreError(f"expected the URI of one object (not a prefix ending in '/'): {uri!r}")
    store = open_store(uri, **options)
    if isinstance(store, S3Store):
        if not store.prefix:
            raise StoreError(f"{uri!r} names a bucket, not an object; expected s3://bucket/key")
        parent, _, name = store.prefix.rpartition("/")
        return S3Store(f"s3://{_join(store.bucket, parent)}", **store.options), name
    parent, name = os.path.split(cast(FileStore, store).root)
    if not name:
        raise StoreError(f"{uri!r} names the filesystem root, not an object")
    return FileStore(parent), name
