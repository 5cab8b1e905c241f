"""Downloads against a local HTTP server on 127.0.0.1 (never the internet): good, truncated, corrupted,
missing and flaky mirrors; md5 verification, bounded retries, fallback to the next mirror, atomic writes."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from latentlab.data import MNISTDataModule
from latentlab.data.download import download_file
from latentlab.errors import DataError

LABELS = "t10k-labels-idx1-ubyte.gz"  # 4542 bytes: the small file most tests fetch


class _Handler(BaseHTTPRequestHandler):
    """Routes /<mode>/<file>: good, corrupt (one byte flipped), truncated (half the declared body,
    then the connection closes), missing (404), flaky (503 on the first request, then good)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: _Server = self.server  # type: ignore[assignment]
        _, mode, name = self.path.split("/", 2)
        server.hits[self.path] += 1
        body = server.files.get(name)
        if body is None or mode == "missing" or (mode == "flaky" and server.hits[self.path] == 1):
            self.send_error(404 if mode != "flaky" else 503)
            return
        if mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)
        if mode == "truncated":
            self.close_connection = True

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.hits: Counter[str] = Counter()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/"


@pytest.fixture(scope="module")
def server(shared_data_dir: Path) -> Iterator[_Server]:
    files = {f.name: f.read_bytes() for f in (shared_data_dir / "mnist").glob("*-ubyte.gz")}  # the IDX files only
    srv = _Server(files)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_good_mirror_writes_verified_file(server: _Server, tmp_path: Path) -> None:
    body = server.files[LABELS]
    dest = download_file([server.url("good")], LABELS, tmp_path / "sub" / LABELS, _md5(body), size=len(body))
    assert dest.read_bytes() == body and _leftovers(dest.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # a shared data directory stays readable by the team


@pytest.mark.parametrize(("mode", "reason"), [("truncated", "truncated transfer"), ("corrupt", "md5")])
def test_bad_transfer_retries_boundedly_and_leaves_nothing(server: _Server, tmp_path: Path, mode: str,
                                                           reason: str) -> None:
    body = server.files[LABELS]
    before = server.hits[f"/{mode}/{LABELS}"]
    with pytest.raises(DataError, match=reason) as err:
        download_file([server.url(mode)], LABELS, tmp_path / LABELS, _md5(body), retries=2, backoff=0)
    assert server.hits[f"/{mode}/{LABELS}"] - before == 2  # exactly `retries` attempts
    assert "copy the file there by hand" in str(err.value)
    assert not (tmp_path / LABELS).exists() and _leftovers(tmp_path) == []


def test_failing_mirror_falls_back_to_next(server: _Server, tmp_path: Path) -> None:
    body = server.files[LABELS]
    before = server.hits[f"/missing/{LABELS}"]
    mirrors = [server.url("missing"), server.url("corrupt"), server.url("good")]
    download_file(mirrors, LABELS, tmp_path / LABELS, _md5(body), retries=2, backoff=0)
    assert (tmp_path / LABELS).read_bytes() == body
    assert server.hits[f"/missing/{LABELS}"] - before == 1  # a 404 is not retried


def test_transient_error_is_retried(server: _Server, tmp_path: Path) -> None:
    body = server.files["train-labels-idx1-ubyte.gz"]
    download_file([server.url("flaky")], "train-labels-idx1-ubyte.gz", tmp_path / "f.gz", _md5(body), backoff=0)
    assert (tmp_path / "f.gz").read_bytes() == body and server.hits["/flaky/train-labels-idx1-ubyte.gz"] == 2


def test_failed_download_keeps_existing_file_untouched(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / LABELS
    dest.write_bytes(b"old")
    with pytest.raises(DataError):
        download_file([server.url("truncated")], LABELS, dest, _md5(server.files[LABELS]), retries=1)
    assert dest.read_bytes() == b"old"


def test_datamodule_downloads_missing_and_replaces_corrupted_files(server: _Server, tmp_path: Path) -> None:
    mirrors = [server.url("missing"), server.url("good")]
    dm = MNISTDataModule(data_dir=tmp_path, download=True, mirrors=mirrors, train_subset=10)
    dm.prepare_data()
    for name, body in server.files.items():
        assert (tmp_path / "mnist" / name).read_bytes() == body
    (tmp_path / "mnist" / LABELS).write_bytes(server.files[LABELS][:-1] + b"x")  # corrupt one file
    dm2 = MNISTDataModule(data_dir=tmp_path, download=True, mirrors=mirrors, train_subset=10)
    dm2.setup()
    assert (tmp_path / "mnist" / LABELS).read_bytes() == server.files[LABELS]
    assert (dm2.num_train, dm2.num_val, dm2.num_test) == (10, 5000, 10000)
    assert _leftovers(tmp_path / "mnist") == []


def test_datamodule_download_failure_names_every_mirror(server: _Server, tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=tmp_path, download=True, mirrors=[server.url("missing")])
    with pytest.raises(DataError, match="HTTP 404") as err:
        dm.prepare_data()
    assert server.url("missing") in str(err.value)
