"""fetch_archive against a real loopback HTTP server: progress, resume, restart, checksums, traversal."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from transfer.data.fetch import (
    ChecksumMismatchError,
    DownloadError,
    UnsafeArchiveError,
    fetch_archive,
    sha256_of,
    unpack_archive,
)


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# d2l's hotdog.zip layout, with enough bytes that a dropped connection is mid-file.
HOTDOG = {
    "hotdog/train/hotdog/1.png": b"a" * 50_000,
    "hotdog/train/not-hotdog/2.png": b"b" * 50_000,
    "hotdog/test/hotdog/3.png": b"c" * 1000,
}


class ArchiveServer:
    """A real HTTP server on 127.0.0.1 serving one payload, with switchable misbehaviour."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.drop_after: int | None = None  # close the connection after this many bytes (once)
        self.ignore_range = False
        self.requests: list[str | None] = []  # the Range header of each request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append(rng)
                body, start = server.payload, 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if server.drop_after is not None:
                    chunk = chunk[: server.drop_after]
                    server.drop_after = None
                self.wfile.write(chunk)
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hotdog.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def hotdog_zip() -> bytes:
    return make_zip(HOTDOG)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sha256_of_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello" * 1000)
    assert sha256_of(f) == digest(b"hello" * 1000)


def test_http_download_unpacks_zip(tmp_path: Path, hotdog_zip: bytes) -> None:
    with ArchiveServer(hotdog_zip) as srv:
        out = fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "raw", cache_dir=tmp_path / "cache")
    assert out == tmp_path / "raw"
    assert (out / "hotdog/train/hotdog/1.png").read_bytes() == HOTDOG["hotdog/train/hotdog/1.png"]
    assert not list((tmp_path / "cache").glob("*.part"))


def test_cached_archive_is_not_downloaded_again(tmp_path: Path, hotdog_zip: bytes) -> None:
    with ArchiveServer(hotdog_zip) as srv:
        fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "a", cache_dir=tmp_path / "cache")
        fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "b", cache_dir=tmp_path / "cache")
        assert len(srv.requests) == 1


def test_dropped_connection_resumes_with_range(tmp_path: Path, hotdog_zip: bytes) -> None:
    with ArchiveServer(hotdog_zip) as srv:
        srv.drop_after = 30_000
        fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "raw", cache_dir=tmp_path / "cache")
        assert srv.requests == [None, "bytes=30000-"]
    assert (tmp_path / "raw/hotdog/test/hotdog/3.png").exists()


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, hotdog_zip: bytes) -> None:
    cache = tmp_path / "cache"
    with ArchiveServer(hotdog_zip) as srv:
        srv.drop_after, srv.ignore_range = 30_000, True
        fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "raw", cache_dir=cache)
        assert srv.requests[1] == "bytes=30000-"  # asked to resume, got a 200 with everything
    assert sha256_of(next(cache.iterdir())) == digest(hotdog_zip)


def test_corrupt_part_file_is_restarted(tmp_path: Path, hotdog_zip: bytes) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with ArchiveServer(hotdog_zip) as srv:
        name = f"{digest(hotdog_zip)[:16]}-hotdog.zip.part"
        (cache / name).write_bytes(b"garbage from an older file")
        fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "raw", cache_dir=cache)
        assert srv.requests[0] is not None and srv.requests[-1] is None  # resumed, then clean restart
    assert (tmp_path / "raw/hotdog/train/not-hotdog/2.png").exists()


def test_wrong_checksum_says_expected_actual_and_url(tmp_path: Path, hotdog_zip: bytes) -> None:
    wrong = "0" * 64
    with ArchiveServer(hotdog_zip) as srv:
        with pytest.raises(ChecksumMismatchError) as err:
            fetch_archive(srv.url, wrong, tmp_path / "raw", cache_dir=tmp_path / "cache")
        message = str(err.value)
    assert wrong in message and digest(hotdog_zip) in message and srv.url in message
    assert not (tmp_path / "raw").exists()


def test_http_404_is_a_download_error(tmp_path: Path, hotdog_zip: bytes) -> None:
    with ArchiveServer(hotdog_zip) as srv:
        srv.httpd.RequestHandlerClass.do_GET = lambda self: self.send_error(404)
        with pytest.raises(DownloadError, match="404"):
            fetch_archive(srv.url, digest(hotdog_zip), tmp_path / "raw", cache_dir=tmp_path / "cache", retries=2)


def test_local_path_and_file_url_tar_gz(tmp_path: Path) -> None:
    data = make_tar_gz({"imgs/cat/a.png": b"x", "imgs/dog/b.png": b"y"})
    archive = tmp_path / "imgs.tar.gz"
    archive.write_bytes(data)
    fetch_archive(str(archive), digest(data), tmp_path / "p")
    fetch_archive(archive.as_uri(), digest(data), tmp_path / "u")
    assert (tmp_path / "p/imgs/cat/a.png").read_bytes() == b"x"
    assert (tmp_path / "u/imgs/dog/b.png").read_bytes() == b"y"
    with pytest.raises(ChecksumMismatchError):
        fetch_archive(str(archive), "f" * 64, tmp_path / "bad")


def test_unpack_replaces_previous_contents(tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    (dest / "stale").mkdir(parents=True)
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"new.txt": b"1"}))
    unpack_archive(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_path_traversal_is_refused(tmp_path: Path, name: str) -> None:
    for maker, suffix in ((make_zip, "zip"), (make_tar_gz, "tar.gz")):
        archive = tmp_path / f"evil.{suffix}"
        archive.write_bytes(maker({"fine.txt": b"1", name: b"pwned"}))
        with pytest.raises(UnsafeArchiveError, match="outside the destination"):
            unpack_archive(archive, tmp_path / "dest" / "inner")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "dest" / "inner").exists()


def test_tar_symlink_escaping_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tf.addfile(link)
    archive = tmp_path / "link.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="link"):
        unpack_archive(archive, tmp_path / "dest")


def test_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "x.zip"
    bogus.write_bytes(b"not an archive")
    with pytest.raises(Exception, match="neither a zip nor a tar"):
        fetch_archive(str(bogus), digest(b"not an archive"), tmp_path / "d")
