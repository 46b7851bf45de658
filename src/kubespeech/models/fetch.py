"""Download a model into a cache directory: resumable, checksum-verified, atomic and idempotent.

Sources: ``hf://org/name[/path/in/repo][@revision]`` (Hugging Face; ``HF_ENDPOINT``, ``HF_TOKEN``),
``ngc://org/[team/]model:version[/file]`` (NVIDIA NGC; ``NGC_ENDPOINT``, ``NGC_API_KEY``), ``https://...``
(and ``http://``), ``s3://bucket/key`` or ``s3://bucket/prefix/`` (boto3, the ``s3`` extra; credentials from
the standard AWS chain, e.g. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; an S3-compatible store such as
MinIO or Ceph via ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``), and a local file or directory.

How a fetch behaves (this is what the operator's model-cache Job runs, and Jobs retry):

- Files are written under ``DIR/.kubespeech-partial/`` and renamed into place only once every file is
  complete and verified, so the destination never holds a partial or unverified file.
- Verification: the sha256 given with ``--sha256`` or published by the source (Hugging Face LFS files), else
  the size the source announced.
- An interrupted HTTP or S3 transfer resumes with a ``Range`` request, within this run (retries with
  backoff) and in the next run: after a network failure the partial data is kept for that purpose. Every
  other failure (401/403/404, no credentials, checksum mismatch, no space) removes what this run wrote, and
  a destination directory this run created is removed again.
- ``DIR/.kubespeech-fetch.json`` records what was fetched; a second run with the same source and files
  present does nothing (no network access).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

log = logging.getLogger(__name__)

PARTIAL_DIR = ".kubespeech-partial"
MANIFEST = ".kubespeech-fetch.json"
_CHUNK = 1 << 20


class FetchError(Exception):
    """A fetch failed; ``exit_code`` is what ``kubespeech model fetch`` exits with."""

    exit_code = 1
    keep_partial = False


class BadSource(FetchError):
    exit_code = 2


class NotFound(FetchError):
    exit_code = 3


class AccessDenied(FetchError):
    exit_code = 4


class ChecksumMismatch(FetchError):
    exit_code = 5


class NoSpace(FetchError):
    exit_code = 6


class TransferFailed(FetchError):
    """The network failed after every retry: partial data stays for the next run to resume."""

    exit_code = 7
    keep_partial = True


@dataclass(slots=True)
class RemoteFile:
    """One file of a source: where it comes from and what it must look like once downloaded."""

    name: str  # path relative to the destination directory
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None
    local: Path | None = None
    s3: tuple[str, str] | None = None
    extract_zip: bool = False  # NGC whole-version downloads arrive as one zip to unpack


@dataclass(slots=True)
class FetchResult:
    paths: list[Path]
    downloaded: bool  # False when everything was already present


# ----- progress ---------------------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal; otherwise a log line every ``interval_s`` seconds (for Job logs)."""

    def __init__(self, tty: bool | None = None, interval_s: float = 10.0) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval_s = interval_s
        self._bar: Any = None
        self._task: Any = None
        self._name = ""
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._last_log = 0.0

    def start(self, name: str, total: int | None, done: int = 0) -> None:
        self._name, self._total, self._done = name, total, done
        self._started = self._last_log = time.monotonic()
        if self.tty:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(name, total=total, completed=done)
        else:
            log.info("downloading", extra={"file": name, "bytes_total": total, "resumed_at": done})

    def advance(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            rate = self._done / max(now - self._started, 1e-6)
            pct = round(100.0 * self._done / self._total, 1) if self._total else None
            log.info(
                "download progress",
                extra={"file": self._name, "bytes_done": self._done, "bytes_total": self._total, "percent": pct,
                       "mb_per_s": round(rate / 1e6, 2)},
            )  # fmt: skip

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        else:
            seconds = time.monotonic() - self._started
            log.info(
                "downloaded", extra={"file": self._name, "bytes": self._done, "seconds": round(seconds, 2)}
            )


# ----- sources ----------------------------------------------------------------------------------------


def _split_revision(rest: str) -> tuple[str, str | None]:
    if "@" in rest:
        path, revision = rest.rsplit("@", 1)
        return path, revision or None
    return rest, None


def _hf_files(rest: str, client: httpx.Client, include: str | None) -> list[RemoteFile]:
    path, revision = _split_revision(rest)
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2:
        raise BadSource(f"hf:// source needs org/name, got '{path}'")
    repo, in_repo = "/".join(parts[:2]), "/".join(parts[2:])
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    rev = revision or "main"
    info = _get_json(
        client, f"{endpoint}/api/models/{repo}/revision/{quote(rev, safe='')}?blobs=true", headers
    )
    commit = str(info.get("sha") or rev)
    files = []
    for sibling in info.get("siblings") or []:
        name = str(sibling.get("rfilename", ""))
        if not name or name == ".gitattributes":
            continue
        if in_repo and name != in_repo:
            continue
        if include and not fnmatch.fnmatch(name, include):
            continue
        lfs = sibling.get("lfs") or {}
        files.append(
            RemoteFile(
                name=Path(name).name if in_repo else name,
                url=f"{endpoint}/{repo}/resolve/{commit}/{quote(name)}",
                headers=dict(headers),
                size=_int_or_none(lfs.get("size", sibling.get("size"))),
                sha256=lfs.get("sha256") or None,
            )
        )
    if not files:
        what = f"file '{in_repo}'" if in_repo else "files" + (f" matching '{include}'" if include else "")
        raise NotFound(f"no {what} in hf://{repo}@{rev}")
    return files


def _ngc_files(rest: str, client: httpx.Client, include: str | None) -> list[RemoteFile]:
    if ":" not in rest:
        raise BadSource(f"ngc:// source needs a version: ngc://org/[team/]model:version, got '{rest}'")
    model_path, version_part = rest.split(":", 1)
    version, _, file_name = version_part.partition("/")
    segments = [s for s in model_path.split("/") if s]
    if len(segments) not in (2, 3) or not version:
        raise BadSource(f"ngc:// source must be ngc://org/[team/]model:version[/file], got '{rest}'")
    endpoint = os.environ.get("NGC_ENDPOINT", "https://api.ngc.nvidia.com").rstrip("/")
    headers = {}
    if os.environ.get("NGC_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['NGC_API_KEY']}"
    base = f"{endpoint}/v2/models/{'/'.join(segments)}/versions/{quote(version, safe='')}"
    if file_name:
        return [
            RemoteFile(name=Path(file_name).name, url=f"{base}/files/{quote(file_name)}", headers=headers)
        ]
    try:
        listing = _get_json(client, f"{base}/files", headers)
    except NotFound:
        listing = {}
    files = []
    for entry in listing.get("modelFiles") or listing.get("files") or []:
        name = str(entry.get("path") or entry.get("name") or "")
        if not name or (include and not fnmatch.fnmatch(name, include)):
            continue
        files.append(
            RemoteFile(
                name=name.lstrip("/"),
                url=f"{base}/files/{quote(name.lstrip('/'))}",
                headers=dict(headers),
                size=_int_or_none(entry.get("sizeInBytes", entry.get("size"))),
                sha256=entry.get("sha256") or None,
            )
        )
    if files:
        return files
    # No listing available: NGC serves every version as one zip.
    return [
        RemoteFile(name=f"{segments[-1]}-{version}.zip", url=f"{base}/zip", headers=headers, extract_zip=True)
    ]


def _http_files(source: str, name: str | None) -> list[RemoteFile]:
    path = urlsplit(source).path
    file_name = name or unquote(path.rsplit("/", 1)[-1])
    if not file_name:
        raise BadSource(f"cannot tell a file name from {source}; pass --name")
    return [RemoteFile(name=file_name, url=source)]


def _s3_files(rest: str, include: str | None, timeout_s: float = 30.0) -> list[RemoteFile]:
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise BadSource("s3:// source needs s3://bucket/key or s3://bucket/prefix/")
    client = _s3_client(timeout_s)
    if key.endswith("/"):
        files = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents") or []:
                    rel = str(obj["Key"])[len(key) :]
                    if rel and not rel.endswith("/") and (not include or fnmatch.fnmatch(rel, include)):
                        files.append(
                            RemoteFile(name=rel, size=int(obj["Size"]), s3=(bucket, str(obj["Key"])))
                        )
        except Exception as exc:
            raise _s3_error(exc, f"s3://{bucket}/{key}") from exc
        if not files:
            matching = f" matching '{include}'" if include else ""
            raise NotFound(f"no objects{matching} under s3://{bucket}/{key}")
        return files
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = _s3_error(exc, f"s3://{bucket}/{key}")
        if isinstance(error, NotFound):
            error = _s3_not_found(client, bucket, key)
        raise error from exc
    return [RemoteFile(name=key.rsplit("/", 1)[-1], size=int(head["ContentLength"]), s3=(bucket, key))]


def _s3_not_found(client: Any, bucket: str, key: str) -> NotFound:
    """Which is missing, the bucket or the key: a HEAD answers a bare 404 for both."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        if isinstance(_s3_error(exc, f"s3://{bucket}"), NotFound):
            return NotFound(f"no such bucket: s3://{bucket}")
        return NotFound(f"not found: s3://{bucket}/{key}")
    hint = ""
    with contextlib.suppress(Exception):
        if client.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1).get("KeyCount"):
            hint = f" (a prefix of that name exists: use s3://{bucket}/{key}/ for every object under it)"
    return NotFound(f"no such key: s3://{bucket}/{key}{hint}")


def _local_files(source: str, include: str | None) -> list[RemoteFile]:
    root = Path(source[len("file://") :] if source.startswith("file://") else source).expanduser()
    if root.is_file():
        return [RemoteFile(name=root.name, size=root.stat().st_size, local=root)]
    if root.is_dir():
        files = [
            RemoteFile(name=str(p.relative_to(root)), size=p.stat().st_size, local=p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and (not include or fnmatch.fnmatch(str(p.relative_to(root)), include))
        ]
        if files:
            return files
    raise NotFound(f"no such file or directory: {root}")


def plan(
    source: str,
    client: httpx.Client,
    *,
    name: str | None = None,
    include: str | None = None,
    timeout_s: float = 30.0,
) -> list[RemoteFile]:
    """The files ``source`` stands for, with what is known of their sizes and checksums."""
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    rest = source.split("://", 1)[1] if scheme else source
    if scheme == "hf":
        files = _hf_files(rest, client, include)
    elif scheme == "ngc":
        files = _ngc_files(rest, client, include)
    elif scheme in ("http", "https"):
        files = _http_files(source, name)
    elif scheme == "s3":
        files = _s3_files(rest, include, timeout_s)
    elif scheme in ("", "file"):
        files = _local_files(source, include)
    else:
        raise BadSource(f"unsupported source scheme '{scheme}://' (hf, ngc, https, s3 or a local path)")
    if name is not None and len(files) == 1 and not files[0].extract_zip:
        files[0].name = name
    for f in files:
        if Path(f.name).is_absolute() or ".." in Path(f.name).parts:
            raise BadSource(f"refusing file name outside the destination: {f.name}")
    return files


# ----- HTTP -------------------------------------------------------------------------------------------


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _status_error(status: int, url: str) -> FetchError:
    where = url.split("?", 1)[0]
    if status == 401:
        return AccessDenied(f"401 Unauthorized for {where}: set a token (HF_TOKEN / NGC_API_KEY) with access")
    if status == 403:
        return AccessDenied(
            f"403 Forbidden for {where}: the credentials lack access (or a license must be accepted)"
        )
    if status == 404:
        return NotFound(f"404 Not Found: {where}")
    if status == 416:
        return TransferFailed(f"416 Range Not Satisfiable for {where}")
    return TransferFailed(f"HTTP {status} for {where}")


def _get_json(client: httpx.Client, url: str, headers: dict[str, str]) -> dict[str, Any]:
    try:
        response = client.get(url, headers=headers)
    except httpx.TransportError as exc:
        raise TransferFailed(f"cannot reach {url.split('?', 1)[0]}: {exc}") from exc
    if response.status_code >= 400:
        raise _status_error(response.status_code, url)
    try:
        data = response.json()
    except ValueError as exc:
        raise TransferFailed(f"{url} did not return JSON") from exc
    return data if isinstance(data, dict) else {}


def _transient(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _download_http(client: httpx.Client, f: RemoteFile, part: Path, progress: Progress, retries: int) -> None:
    """Append ``f`` to ``part`` from where it stops, retrying network failures with Range requests."""
    assert f.url is not None
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if f.size is not None and have == f.size:
            return
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        # Identity encoding: byte ranges must refer to the stored bytes, not to a compressed stream.
        headers = {**f.headers, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with client.stream("GET", f.url, headers=headers) as response:
                status = response.status_code
                if status == 416 and have:
                    # Our partial file is at least as long as the resource: verification decides.
                    return
                if status >= 400:
                    error = _status_error(status, f.url)
                    if not _transient(status):
                        raise error
                    raise _Retry(str(error))
                if status == 206:
                    start = _content_range_start(response.headers.get("content-range"))
                    if start != have:
                        part.unlink(missing_ok=True)
                        raise _Retry(f"server resumed at byte {start}, not {have}")
                elif have:
                    # The server ignored the Range header: start over.
                    part.unlink()
                    have = 0
                length = _int_or_none(response.headers.get("content-length"))
                total = have + length if length is not None else f.size
                if f.size is None and total is not None:
                    f.size = total
                if length is not None and length > _free_bytes(part.parent):
                    free = _free_bytes(part.parent)
                    raise NoSpace(
                        f"not enough space for {f.name}: need {length / 1e6:.1f} MB, {free / 1e6:.1f} MB free"
                    )
                progress.start(f.name, total, have)
                try:
                    with part.open("ab") as out:
                        # No chunk_size: bytes go to disk as they arrive, so a broken connection
                        # loses nothing that a Range request would have to fetch again.
                        for chunk in response.iter_raw():
                            out.write(chunk)
                            progress.advance(len(chunk))
                finally:
                    progress.finish()
                got = part.stat().st_size
                if total is not None and got < total:
                    raise _Retry(f"connection closed at byte {got} of {total}")
                return
        except (httpx.TransportError, _Retry) as exc:
            attempt += 1
            if attempt > retries:
                raise TransferFailed(
                    f"download of {f.name} failed after {retries} retries: {exc}; run again to resume"
                ) from exc
            delay = min(0.2 * 2**attempt, 10.0)
            log.warning(
                "download interrupted; resuming",
                extra={"file": f.name, "error": str(exc), "retry_in_s": delay},
            )
            time.sleep(delay)


class _Retry(Exception):
    """A transient failure inside one HTTP attempt."""


def _content_range_start(value: str | None) -> int:
    # "bytes 100-999/1000"
    try:
        return int((value or "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


# ----- S3 and local -----------------------------------------------------------------------------------


def _s3_client(timeout_s: float = 30.0) -> Any:
    """An S3 client: credentials from the standard AWS chain, the endpoint from ``AWS_ENDPOINT_URL(_S3)``."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise BadSource("s3:// sources need boto3: pip install boto3 (the kubespeech[s3] extra)") from None
    # boto3 reads these two itself too; passing the endpoint explicitly also makes botocore address buckets
    # by path (http://minio:9000/bucket/key), which MinIO or Ceph behind a plain service name needs.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=min(timeout_s, 10.0),
        read_timeout=timeout_s,
        # Few botocore retries: _download_s3 retries by itself, resuming where the data stopped.
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


_S3_DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
}
_S3_TRANSIENT = {"InternalError", "RequestTimeout", "ServiceUnavailable", "SlowDown", "Throttling"}


def _s3_error(exc: Exception, where: str) -> FetchError:
    """The FetchError (and so the exit code) for a boto3/botocore exception."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return AccessDenied(
            f"no usable AWS credentials for {where} ({exc}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(for the model-cache Job: spec.modelCache.env from a Secret)"
        )
    if isinstance(exc, ParamValidationError):
        return BadSource(f"{where}: {exc}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = _int_or_none(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")) or 0
        if code == "NoSuchBucket":
            return NotFound(f"no such bucket: s3://{where[len('s3://') :].split('/', 1)[0]}")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NotFound(f"not found: {where}")
        if code in _S3_DENIED or status in (401, 403):
            return AccessDenied(
                f"access denied ({code or status}) for {where}: the credentials lack access "
                "(S3 also answers 403 for a missing key when they lack s3:ListBucket)"
            )
        if code == "InvalidBucketName":
            return BadSource(f"invalid bucket name in {where}")
        if code in _S3_TRANSIENT or status >= 500 or status in (408, 429):
            return TransferFailed(f"{where}: {code or status}: {exc}")
        return FetchError(f"{where}: {code or status}: {exc}")
    if isinstance(exc, BotoCoreError):
        # Endpoint unreachable, timeouts, a body cut short: the next attempt or run resumes.
        return TransferFailed(f"{where}: {exc}")
    return TransferFailed(f"{where}: {type(exc).__name__}: {exc}")


def _download_s3(client: Any, f: RemoteFile, part: Path, progress: Progress, retries: int) -> None:
    """Append ``f`` to ``part`` from where it stops, retrying network failures with ranged GETs."""
    from botocore.exceptions import BotoCoreError, ClientError

    assert f.s3 is not None
    bucket, key = f.s3
    where = f"s3://{bucket}/{key}"
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if f.size is not None and have == f.size:
            return
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        try:
            try:
                kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
                if have:
                    kwargs["Range"] = f"bytes={have}-"
                response = client.get_object(**kwargs)
                body = response["Body"]
                if have and response.get("ContentRange") is None:
                    # The store ignored the Range and sends the whole object: start the file over.
                    part.unlink()
                    have = 0
                elif have and _content_range_start(response["ContentRange"]) != have:
                    body.close()
                    part.unlink(missing_ok=True)
                    raise _Retry(f"store resumed at {response['ContentRange']}, not at byte {have}")
                progress.start(f.name, f.size, have)
                try:
                    with part.open("ab") as out:
                        while chunk := body.read(_CHUNK):
                            out.write(chunk)
                            progress.advance(len(chunk))
                finally:
                    progress.finish()
                    body.close()
            except (BotoCoreError, ClientError) as exc:
                error = _s3_error(exc, where)
                if not error.keep_partial:
                    raise error from exc
                raise _Retry(str(error)) from exc
            got = part.stat().st_size
            if f.size is not None and got < f.size:
                raise _Retry(f"transfer stopped at byte {got} of {f.size}")
            return
        except _Retry as exc:
            attempt += 1
            if attempt > retries:
                raise TransferFailed(
                    f"download of {f.name} failed after {retries} retries: {exc}; run again to resume"
                ) from exc
            delay = min(0.2 * 2**attempt, 10.0)
            log.warning(
                "download interrupted; resuming",
                extra={"file": f.name, "error": str(exc), "retry_in_s": delay},
            )
            time.sleep(delay)


def _copy_local(f: RemoteFile, part: Path, progress: Progress) -> None:
    assert f.local is not None
    have = part.stat().st_size if part.exists() else 0
    progress.start(f.name, f.size, have)
    try:
        with f.local.open("rb") as src, part.open("ab") as out:
            src.seek(have)
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
                progress.advance(len(chunk))
    finally:
        progress.finish()


# ----- verification and the fetch itself ---------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, f: RemoteFile) -> None:
    """Check ``path`` against ``f``'s sha256 when known, and its size when known."""
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        raise ChecksumMismatch(f"{f.name}: got {size} bytes, expected {f.size}")
    if f.sha256:
        digest = sha256_of(path)
        if digest != f.sha256.lower():
            raise ChecksumMismatch(
                f"{f.name}: sha256 {digest} does not match the expected {f.sha256.lower()}"
            )


def _present_and_valid(target: Path, f: RemoteFile) -> bool:
    """A file already at the destination that the source's checksum or size vouches for."""
    if f.extract_zip or not target.is_file() or (f.sha256 is None and f.size is None):
        return False
    try:
        _verify(target, f)
    except ChecksumMismatch:
        return False  # stale or foreign: fetched again and replaced atomically
    return True


def _read_manifest(dest: Path) -> dict[str, Any]:
    try:
        data = json.loads((dest / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _already_present(dest: Path, source: str, sha256: str | None) -> list[Path] | None:
    """The fetched files when an earlier run completed this same fetch, else None."""
    manifest = _read_manifest(dest)
    if manifest.get("source") != source or not manifest.get("files"):
        return None
    paths = []
    for entry in manifest["files"]:
        path = dest / str(entry.get("name", ""))
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return None
        paths.append(path)
    if sha256 is not None and (len(paths) != 1 or sha256_of(paths[0]) != sha256.lower()):
        return None
    return paths


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _check_space(dest: Path, files: list[RemoteFile], staging: Path) -> None:
    need = 0
    for f in files:
        if f.size is None:
            continue
        part = staging / f.name
        need += f.size - (part.stat().st_size if part.exists() else 0)
        if f.extract_zip:
            need += f.size  # unpacked copy next to the zip
    free = _free_bytes(dest)
    if need > free:
        raise NoSpace(f"not enough space in {dest}: need {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free")


def _extract(zip_path: Path, into: Path) -> list[str]:
    names = []
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            target = Path(member.filename)
            if target.is_absolute() or ".." in target.parts:
                raise BadSource(f"zip entry outside the destination: {member.filename}")
            if not member.is_dir():
                names.append(member.filename)
        archive.extractall(into)
    return names


@contextlib.contextmanager
def _no_space_guard() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpace(f"no space left on device: {exc.filename or ''}".strip()) from exc
        raise


def fetch(
    source: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    name: str | None = None,
    include: str | None = None,
    retries: int = 5,
    timeout_s: float = 30.0,
    progress: Progress | None = None,
    client_factory: Callable[[], httpx.Client] | None = None,
) -> FetchResult:
    """Fetch ``source`` into directory ``dest``; see the module docstring for the guarantees."""
    dest = Path(dest)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BadSource("--sha256 must be 64 hex digits")
    present = _already_present(dest, source, sha256) if dest.is_dir() else None
    if present is not None:
        log.info("already present", extra={"source": _redact(source), "dest": str(dest)})
        return FetchResult(present, downloaded=False)
    progress = progress or Progress()
    created = not dest.exists()
    staging = dest / PARTIAL_DIR
    new_client = client_factory or (
        lambda: httpx.Client(
            follow_redirects=True, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        )
    )
    written: list[Path] = []
    s3_client: Any = None
    try:
        with new_client() as client:
            files = plan(source, client, name=name, include=include, timeout_s=timeout_s)
            if sha256 is not None:
                if len(files) != 1:
                    raise BadSource(f"--sha256 needs a single-file source; {source} has {len(files)} files")
                files[0].sha256 = sha256
            with _no_space_guard():
                dest.mkdir(parents=True, exist_ok=True)
                staging.mkdir(exist_ok=True)
                final: list[tuple[Path, Path, RemoteFile]] = []
                missing: list[RemoteFile] = []
                for f in files:
                    if _present_and_valid(dest / f.name, f):
                        log.info("file already present", extra={"file": f.name})
                        final.append((dest / f.name, dest / f.name, f))
                    else:
                        missing.append(f)
                _check_space(dest, missing, staging)
                for f in missing:
                    part = staging / f.name
                    part.parent.mkdir(parents=True, exist_ok=True)
                    written.append(part)
                    if f.s3 is not None:
                        s3_client = s3_client or _s3_client(timeout_s)
                        _download_s3(s3_client, f, part, progress, retries)
                    elif f.local is not None:
                        _copy_local(f, part, progress)
                    else:
                        _download_http(client, f, part, progress, retries)
                    try:
                        _verify(part, f)
                    except ChecksumMismatch:
                        part.unlink(missing_ok=True)
                        raise
                    final.append((part, dest / f.name, f))
                paths = _commit(dest, staging, final, written)
        _write_manifest(dest, source, paths)
        shutil.rmtree(staging, ignore_errors=True)
        return FetchResult(paths, downloaded=True)
    except FetchError as exc:
        _cleanup(dest, staging, written, created, keep_partial=exc.keep_partial)
        raise
    except BaseException:
        _cleanup(dest, staging, written, created, keep_partial=True)
        raise


def _commit(
    dest: Path, staging: Path, final: list[tuple[Path, Path, RemoteFile]], written: list[Path]
) -> list[Path]:
    """Move every verified file into place (``os.replace`` is atomic within one filesystem)."""
    paths: list[Path] = []
    for src, target, f in final:
        if f.extract_zip:
            unpack = staging / (f.name + ".d")
            shutil.rmtree(unpack, ignore_errors=True)
            written.append(unpack)
            for member in _extract(src, unpack):
                out = dest / member
                out.parent.mkdir(parents=True, exist_ok=True)
                os.replace(unpack / member, out)
                paths.append(out)
            src.unlink()
            continue
        if src != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        paths.append(target)
    return paths


def _write_manifest(dest: Path, source: str, paths: list[Path]) -> None:
    data = {
        "source": source,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"name": str(p.relative_to(dest)), "size": p.stat().st_size} for p in paths],
    }
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, dest / MANIFEST)


def _cleanup(dest: Path, staging: Path, written: list[Path], created: bool, *, keep_partial: bool) -> None:
    if not keep_partial:
        for path in written:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(dest, ignore_errors=True)


def _redact(source: str) -> str:
    """Sources never carry credentials here, but presigned URLs carry signatures in the query."""
    return source.split("?", 1)[0]
