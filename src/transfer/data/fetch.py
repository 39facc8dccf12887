"""Fetch a dataset archive (http, https, file URL or local path), verify it, unpack it safely.

Public API:

* `sha256_of` - hex sha256 of a file, streamed.
* `fetch_archive` - download (with progress and HTTP Range resume) into a
  cache, verify the sha256, unpack a .zip / .tar.gz / .tgz / .tar into
  `dest_dir` atomically, and return `dest_dir`.

Why a cache outside the repository: a half-downloaded `.part` file must
survive an interrupted run (so the next run resumes) but must never land in a
DVC-tracked output folder. The cache lives in `$TRANSFER_CACHE_DIR` or
`$XDG_CACHE_HOME/transfer/downloads` (`~/.cache/transfer/downloads`).

Failure modes are explicit errors, never a silently wrong data set:
`ChecksumMismatchError` (says expected, actual and the URL),
`DownloadError` (network / HTTP problems after retries),
`UnsafeArchiveError` (a member would escape `dest_dir`) and
`ArchiveTooLargeError` (more bytes, files or compression than `ArchiveLimits` allow; the
sizes come from the member headers, which zipfile and tarfile hold each member to, and are checked
before anything is written).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from transfer.pipeline.errors import UserError
from transfer.pipeline.params import DataParams

CHUNK_SIZE = 1 << 20
# Attempts per fetch; each attempt after the first resumes the .part file.
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT_S = 60.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class FetchError(UserError, RuntimeError):
    """Base class of fetch failures."""


class DownloadError(FetchError):
    """The archive could not be downloaded."""


class ChecksumMismatchError(FetchError):
    """The downloaded bytes do not have the sha256 params.yaml promises."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.url, self.expected, self.actual = url, expected, actual
        super().__init__(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}. "
            "The file changed on the server or the download is damaged; if the new file is "
            "trusted, put its sha256 in params.yaml (data.sha256)."
        )


class UnsafeArchiveError(FetchError):
    """An archive member would be written outside the destination folder."""


class ArchiveTooLargeError(FetchError):
    """Unpacking would exceed a limit (total size, file count, compression ratio): a decompression bomb?"""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may unpack to (data.archive_max_bytes, data.archive_max_files, data.archive_max_ratio;
    the defaults are the schema's)."""

    max_bytes: int = DataParams.model_fields["archive_max_bytes"].default
    max_files: int = DataParams.model_fields["archive_max_files"].default
    max_ratio: float = DataParams.model_fields["archive_max_ratio"].default  # unpacked bytes per archive byte


# Below this many unpacked bytes the ratio is not checked: a small archive of text may compress 1000x
# and harm nothing; a bomb matters once it can fill a disk or the DVC cache.
RATIO_FLOOR_BYTES = 64 * 1024**2


class _Budget:
    """Running totals of an archive's members, checked against the limits as each header is read."""

    def __init__(self, archive: Path, limits: ArchiveLimits):
        self.archive, self.limits = archive, limits
        self.archive_bytes = max(1, archive.stat().st_size)
        self.files = self.bytes = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += max(0, size)
        limits, ratio = self.limits, self.bytes / self.archive_bytes
        problem = (
            f"more than {limits.max_files} members (data.archive_max_files)"
            if self.files > limits.max_files
            else f"more than {limits.max_bytes} bytes unpacked (data.archive_max_bytes)"
            if self.bytes > limits.max_bytes
            else f"a compression ratio above {limits.max_ratio:g} ({self.bytes} bytes from "
            f"{self.archive_bytes}; data.archive_max_ratio)"
            if ratio > limits.max_ratio and self.bytes > RATIO_FLOOR_BYTES
            else None
        )
        if problem:
            raise ArchiveTooLargeError(
                f"archive {self.archive} would unpack to {problem}; refusing to unpack it (nothing was written). "
                "If the archive is trusted and really this large, raise that limit in params.yaml."
            )


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Download cache: $TRANSFER_CACHE_DIR, else $XDG_CACHE_HOME/transfer/downloads."""
    if os.environ.get("TRANSFER_CACHE_DIR"):
        return Path(os.environ["TRANSFER_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "transfer" / "downloads"


def _archive_name(url: str) -> str:
    """Last path component of the URL (or path), for cache file names and format sniffing."""
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    return name or "archive"


def _local_path(url: str) -> Path | None:
    """The local file a URL names (file:// or a plain path), or None for http(s)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise DownloadError(f"unsupported URL scheme {parts.scheme!r} in {url}; use http, https, file or a path")
    return Path(url)


def _download_once(url: str, part: Path, timeout: float) -> None:
    """One attempt: resume `part` with a Range request, or restart it when the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "transfer-fetch/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range not satisfiable: the part is as long as (or longer than) the file, or
            # the file changed. Start over; the checksum will judge the result.
            part.unlink()
            return _download_once(url, part, timeout)
        raise
    with response:
        status = getattr(response, "status", 200)
        if offset and status != 206:
            offset = 0  # the server ignored Range and is sending the whole file: restart cleanly
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else None
        received = 0
        with (
            open(part, "ab" if offset else "wb") as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {_archive_name(url)}",
                leave=False,
            ) as bar,
        ):
            for chunk in iter(lambda: response.read(CHUNK_SIZE), b""):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and received < remaining:
        raise DownloadError(f"connection closed after {offset + received} of {total} bytes from {url}")


def _download(url: str, cached: Path, expected: str, retries: int, timeout: float) -> None:
    """Download `url` into `cached` (via `cached.part`) and verify it; resume on interruption."""
    part = cached.with_name(cached.name + ".part")
    last_error: Exception | None = None
    restarted_after_mismatch = False
    attempt = 0
    while attempt < retries:
        attempt += 1
        try:
            _download_once(url, part, timeout)
        except (urllib.error.URLError, OSError, http.client.HTTPException, DownloadError) as exc:
            # http.client.IncompleteRead / ConnectionResetError / timeouts land here:
            # keep the part file, the next attempt resumes it.
            last_error = exc
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500 and exc.code != 408:
                break  # 404, 403, ...: retrying will not help
            time.sleep(min(2.0, 0.2 * attempt))
            continue
        actual = sha256_of(part)
        if actual == expected:
            os.replace(part, cached)
            return
        part.unlink()
        if not restarted_after_mismatch:
            # A resumed part may have been corrupt (or from an older file): one clean retry.
            restarted_after_mismatch = True
            attempt = min(attempt, retries - 1)
            continue
        raise ChecksumMismatchError(url, expected, actual)
    raise DownloadError(
        f"could not download {url} after {attempt} attempt(s): {last_error}. "
        "Check the URL and the network; rerun to resume the partial download."
    )


def _safe_target(dest: Path, name: str, archive: str) -> Path:
    """Resolve an archive member name under `dest`; refuse absolute or escaping names."""
    posix = PurePosixPath(name.replace("\\", "/"))
    target = (dest / posix).resolve()
    if posix.is_absolute() or ".." in posix.parts or not target.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(
            f"archive {archive} has a member {name!r} that would be written outside the destination "
            "(path traversal); refusing to unpack it. Use a trusted archive with relative member paths."
        )
    return target


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(archive, limits)
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:  # check everything before writing anything
            _safe_target(dest, info.filename, str(archive))
            budget.add(info.file_size)  # zipfile stops each member at its declared size (then checks the CRC)
        for info in tqdm(members, desc=f"unpack {archive.name}", unit="file", leave=False):
            zf.extract(info, dest)


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(archive, limits)
    with tarfile.open(archive) as tf:
        members = []
        for member in tf:  # one header at a time: a bomb is refused at the member that crosses a limit
            members.append(member)
            budget.add(member.size)
            _safe_target(dest, member.name, str(archive))
            if member.issym() or member.islnk():
                link_base = (dest / member.name).parent if member.issym() else dest
                link = PurePosixPath(member.linkname)
                if link.is_absolute() or not (link_base / link).resolve().is_relative_to(dest.resolve()):
                    raise UnsafeArchiveError(
                        f"archive {archive} has a link {member.name!r} -> {member.linkname!r} pointing "
                        "outside the destination; refusing to unpack it."
                    )
            elif not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(
                    f"archive {archive} has a special file {member.name!r} (device or fifo); refusing to unpack it."
                )
        for member in tqdm(members, desc=f"unpack {archive.name}", unit="file", leave=False):
            # filter="data" is the stdlib's own guard (Python >= 3.11.4); ours above gives the clear message.
            tf.extract(member, dest, filter="data")


def unpack_archive(
    archive: str | os.PathLike, dest_dir: str | os.PathLike, limits: ArchiveLimits = ArchiveLimits()
) -> Path:
    """Unpack a zip or tar(.gz/.bz2/.xz) archive into `dest_dir`, atomically, within `limits`.

    Every member is checked (path, links, size, count, ratio) before the first is written. Members go to
    a temporary sibling folder, which then replaces `dest_dir`; an interrupted unpack never leaves a
    half-filled `dest_dir`.
    """
    archive, dest = Path(archive), Path(dest_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpack", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, limits)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, limits)
        else:
            raise FetchError(f"{archive} is neither a zip nor a tar archive; use .zip or .tar.gz")
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download(
    url: str,
    sha256: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Return a verified local copy of `url` (a local file is verified in place, not copied)."""
    expected = sha256.strip().lower()
    if not _SHA256_RE.match(expected):
        raise ValueError(f"sha256 for {url} must be 64 hex digits, got {sha256!r}")
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"archive {local} not found (from {url!r}); check data.url in params.yaml")
        actual = sha256_of(local)
        if actual != expected:
            raise ChecksumMismatchError(url, expected, actual)
        return local
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"{expected[:16]}-{_archive_name(url)}"
    if cached.is_file() and sha256_of(cached) == expected:
        return cached
    _download(url, cached, expected, retries, timeout)
    return cached


def fetch_archive(
    url: str,
    sha256: str,
    dest_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT_S,
    limits: ArchiveLimits = ArchiveLimits(),
) -> Path:
    """Download (or locate) the archive at `url`, check its sha256, unpack it into `dest_dir` within `limits`.

    `url` is http(s)://, file:// or a filesystem path. Returns `dest_dir`.
    """
    archive = download(url, sha256, cache_dir, retries=retries, timeout=timeout)
    return unpack_archive(archive, dest_dir, limits)
