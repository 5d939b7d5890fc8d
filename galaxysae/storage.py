"""Local paths and ``s3://`` URLs behind one small API, with atomic writes.

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``), never from configs, so no
secret is ever written beside an output. A write is atomic: a local file is written under a
temporary name and renamed; an S3 object is sent with a single PUT, so readers see the whole
object or none.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

__all__ = [
    "is_remote", "local_path", "join", "exists", "read_bytes", "write_bytes", "write_parquet", "listdir",
    "fsspec_fs", "arrow_fs", "makedirs", "remove", "s3_options", "check_writable", "StorageError",
    "stamp", "modified", "copy_if_newer",
]


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def local_path(url: str) -> str:
    """A local path or file:// URL as a plain path (a remote URL is the caller's to exclude)."""
    url = str(url)
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    url = str(url)
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(local_path(url), *parts))


def s3_options() -> dict:
    """s3fs options from the standard AWS environment (endpoint included, for S3-compatible stores)."""
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


@lru_cache(maxsize=8)
def _s3fs(_env_key: tuple):
    try:
        import s3fs
    except ImportError as exc:  # pragma: no cover - part of the pinned environment
        raise ImportError("s3:// URLs need s3fs: pip install -r requirements.txt") from exc
    # skip_instance_cache: fsspec would otherwise hand back an instance holding the credentials
    # of an earlier environment (this cache is keyed on the environment instead).
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options())


def _env_key() -> tuple:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return tuple(os.environ.get(n) for n in names)


def fsspec_fs(url: str):
    """(fsspec filesystem, path without scheme) for a local path, an ``s3://`` or ``hf://`` URL."""
    url = str(url)
    if url.startswith("s3://"):
        fs = _s3fs(_env_key())
        return fs, url[len("s3://"):]
    if url.startswith("hf://"):
        # The driver's endpoint and token travel with the filesystem object to every read task
        # (as the S3 keys do), so nodes need neither a login nor HF_ENDPOINT of their own.
        from huggingface_hub import HfFileSystem, constants, get_token

        return HfFileSystem(endpoint=constants.ENDPOINT, token=get_token()), url[len("hf://"):]
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs, path
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(local_path(url))


@lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except Exception:  # noqa: BLE001 - no network to AWS, no such bucket: the SDK decides
        return ""


def arrow_fs(url: str):
    """(pyarrow filesystem, path) for Ray Data and pyarrow readers."""
    import pyarrow.fs as pafs

    url = str(url)
    if url.startswith("s3://"):
        from urllib.parse import urlparse

        kw: dict = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint)
            kw["endpoint_override"] = parsed.netloc or parsed.path
            kw["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        elif endpoint:
            kw["region"] = "us-east-1"  # what S3-compatible servers expect when none is named
        else:
            # AWS itself: the bucket's own region (pyarrow does not follow S3's redirect to it),
            # as s3fs finds it; the SDK's own choice (profile, instance metadata) if that fails.
            region = _bucket_region(url[len("s3://"):].split("/", 1)[0])
            if region:
                kw["region"] = region
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kw["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
            # temporary credentials (SSO, assume-role) are refused without their session token
            if os.environ.get("AWS_SESSION_TOKEN"):
                kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return pafs.S3FileSystem(**kw), url[len("s3://"):]
    if is_remote(url):
        fs, path = fsspec_fs(url)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), os.path.abspath(local_path(url))


def exists(url: str) -> bool:
    fs, path = fsspec_fs(url)
    if is_remote(url):
        return _with_retries(url, "existence check", lambda: fs.exists(path))
    return fs.exists(path)


def _info(url: str) -> dict:
    fs, path = fsspec_fs(url)
    if is_remote(url):
        return _with_retries(url, "metadata read", lambda: fs.info(path))
    return fs.info(path)


def stamp(url: str) -> str:
    """What changes when the file at ``url`` is rewritten: its size and its ETag (S3, the content's
    hash for a single PUT) or modification time (local)."""
    info = _info(url)
    return f"{info.get('size')}:{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"


def modified(url: str) -> float:
    """When the file at ``url`` was last written (seconds since the epoch)."""
    info = _info(url)
    when = info.get("mtime") or info.get("LastModified")
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def copy_if_newer(src: str, dst: str) -> bool:
    """Copy ``src`` to ``dst`` unless ``dst`` exists and was written after ``src``; -> copied."""
    if exists(dst) and modified(dst) >= modified(src):
        return False
    write_bytes(dst, read_bytes(src))
    return True


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(local_path(url), exist_ok=True)


def read_bytes(url: str) -> bytes:
    fs, path = fsspec_fs(url)
    try:
        if is_remote(url):
            return _with_retries(url, "read", lambda: fs.cat_file(path))
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


class StorageError(OSError):
    """Object storage failed for good (after retries); the message names the URL."""


# Failures that retrying cannot fix: wrong credentials, missing bucket, bad arguments.
_FINAL = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, TypeError,
          ValueError)


def _with_retries(url: str, what: str, op):
    """Run ``op()`` against object storage, retrying transient failures with exponential backoff.

    GALAXYSAE_S3_ATTEMPTS (default 5) attempts, GALAXYSAE_S3_BACKOFF_S (default 1 s) doubling
    between them: a store that restarts within ~15 s costs nothing. Wrong credentials fail at
    once with a PermissionError naming the URL and the variables to check (never their values).
    """
    import logging
    import time

    attempts = max(1, int(os.environ.get("GALAXYSAE_S3_ATTEMPTS", "5")))
    delay = float(os.environ.get("GALAXYSAE_S3_BACKOFF_S", "1.0"))
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except PermissionError as exc:
            raise PermissionError(
                f"{url}: {what} refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                f"(and AWS_ENDPOINT_URL) ({exc})") from None
        except _FINAL:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp raise many transient types
            if attempt == attempts:
                raise StorageError(
                    f"{url}: {what} failed after {attempts} attempts over "
                    f"{time.monotonic() - start:.1f} s ({type(exc).__name__}: {exc})") from None
            logging.getLogger(__name__).warning(
                "%s: %s failed (%s: %s); retry %d/%d in %.1f s", url, what, type(exc).__name__,
                exc, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2
            fs, _ = fsspec_fs(url)
            fs.invalidate_cache()


def check_writable(url: str) -> None:
    """Preflight for a job's output: write and delete a hidden probe under ``url``.

    Called before any work starts, so wrong credentials or an unreachable store cost nothing:
    raises PermissionError / StorageError naming ``url``.
    """
    url = str(url)
    probe = join(url, f".galaxysae-probe-{uuid.uuid4().hex[:12]}")
    if not is_remote(url):
        try:
            write_bytes(probe, b"")
            os.unlink(local_path(probe))
        except PermissionError:
            raise PermissionError(f"{url}: output folder is not writable") from None
        return
    fs, path = fsspec_fs(probe)
    _with_retries(url, "writing a probe object", lambda: fs.pipe_file(path, b""))
    _with_retries(url, "deleting a probe object", lambda: fs.rm(path))


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (temp file + rename locally; one PUT on S3).

    On S3, transient failures are retried with backoff (see :func:`_with_retries`); a PUT that
    never completed leaves no object, so readers see the whole object or none.
    """
    url = str(url)
    if is_remote(url):
        fs, path = fsspec_fs(url)
        _with_retries(url, "write", lambda: fs.pipe_file(path, data))
        return
    path = Path(local_path(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def writing(url: str):
    """``with writing(url) as tmp:`` a local file path to write ``url``'s whole content to (a
    file too large to hold in memory, written piece by piece); when the block ends it lands at
    ``url`` atomically, as :func:`write_bytes` does: renamed into place beside it locally, one
    upload (retried) on S3. An error inside the block lands nothing."""
    url = str(url)
    if is_remote(url):
        fd, name = tempfile.mkstemp(prefix="galaxysae-upload-")
        os.close(fd)
        tmp = Path(name)
    else:
        dest = Path(local_path(url))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield str(tmp)
        if is_remote(url):
            fs, path = fsspec_fs(url)
            _with_retries(url, "write", lambda: fs.put_file(str(tmp), path))
        else:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table, url: str, **kwargs) -> None:
    """Write a pyarrow Table as one parquet file at ``url``, atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    write_bytes(url, buf.getvalue())


def listdir(url: str, suffix: str = "") -> list[str]:
    """Sorted full URLs of the files directly under ``url`` ending with ``suffix`` (hidden skipped)."""
    fs, path = fsspec_fs(url)
    # fsspec caches listings per filesystem instance (shared here): a cached one would miss what
    # other processes (Ray workers) wrote since, and exists() answers from a cached parent
    # listing too, so a listing is neither read from nor left in the cache
    fs.invalidate_cache(path)
    try:
        if is_remote(url):
            entries = _with_retries(url, "listing", lambda: fs.ls(path, detail=True))
        else:
            entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(path)
    out = []
    for e in entries:
        name = posixpath.basename(e["name"].rstrip("/"))
        if e.get("type") == "directory" or name.startswith((".", "_")) or not name.endswith(suffix):
            continue
        out.append(join(url, name))
    return sorted(out)


def remove(url: str) -> None:
    fs, path = fsspec_fs(url)
    if not exists(url):
        return
    if is_remote(url):
        _with_retries(url, "delete", lambda: fs.rm(path, recursive=True))
    else:
        fs.rm(path, recursive=True)
