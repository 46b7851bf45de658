"""``kubespeech model fetch`` against a real local HTTP server: ranges, resume, checksums, errors, idempotency."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubespeech.models import fetch as fetch_module
from kubespeech.models.fetch import (
    MANIFEST,
    PARTIAL_DIR,
    AccessDenied,
    BadSource,
    ChecksumMismatch,
    NoSpace,
    NotFound,
    Progress,
    TransferFailed,
    fetch,
)

KUBESPEECH = str(Path(sys.executable).with_name("kubespeech"))
BLOB = bytes(range(256)) * 4096  # 1 MiB, every byte position distinguishable
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


@dataclass
class Behaviour:
    """What the server does; tests change it between fetches."""

    files: dict[str, bytes] = field(default_factory=lambda: {"model.nemo": BLOB})
    drop_after: int | None = None  # close the connection after this many body bytes...
    drops_left: int = 0  # ...this many times
    drop_only: str | None = None  # ...only for this file
    ignore_range: bool = False
    corrupt: set[str] = field(default_factory=set)  # files served with other bytes than announced
    status: dict[str, int] = field(default_factory=dict)  # path -> forced status
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour: Behaviour

    def log_message(self, *args: Any) -> None:
        pass

    def _send(
        self, status: int, body: bytes, content_type: str = "application/octet-stream", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        b = self.behaviour
        path = self.path.split("?", 1)[0]
        b.requests.append((path, self.headers.get("Range")))
        if path in b.status:
            self._send(b.status[path], b"{}", "application/json")
            return
        if path == "/api/models/acme/asr-small/revision/main":
            siblings = [
                {"rfilename": ".gitattributes", "size": 10},
                {"rfilename": "README.md", "size": len(b.files["README.md"])},
                {"rfilename": "asr-small.nemo", "size": 134, "lfs": {"sha256": hashlib.sha256(
                    b.files["asr-small.nemo"]).hexdigest(), "size": len(b.files["asr-small.nemo"])}},
            ]  # fmt: skip
            self._send(200, json.dumps({"sha": "c0ffee", "siblings": siblings}).encode(), "application/json")
            return
        if path.startswith("/acme/asr-small/resolve/c0ffee/"):
            # The Hub redirects LFS files to a CDN: the Range header must survive the redirect.
            self.send_response(302)
            self.send_header("Location", "/files/" + path.rsplit("/", 1)[-1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/v2/models/nvidia/nemo/tts_en_tiny/versions/1.0/files":
            listing = {
                "modelFiles": [{"path": name, "sizeInBytes": len(data)} for name, data in b.files.items()]
            }
            self._send(200, json.dumps(listing).encode(), "application/json")
            return
        if path.startswith("/v2/models/nvidia/nemo/tts_en_tiny/versions/1.0/files/"):
            path = "/files/" + path.rsplit("/", 1)[-1]
        if not path.startswith("/files/") or path[len("/files/") :] not in b.files:
            self._send(404, b"not found", "text/plain")
            return
        name = path[len("/files/") :]
        data = b.files[name][::-1] if name in b.corrupt else b.files[name]
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not b.ignore_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self._send(416, b"", "text/plain", Content_Range=f"bytes */{len(data)}")
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if b.drop_after is not None and b.drops_left > 0 and b.drop_only in (None, name):
            b.drops_left -= 1
            self.wfile.write(body[: b.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@dataclass
class Server:
    url: str
    behaviour: Behaviour


@pytest.fixture
def server() -> Iterator[Server]:
    behaviour = Behaviour()
    handler = type("Handler", (_Handler,), {"behaviour": behaviour})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", behaviour)
    httpd.shutdown()
    httpd.server_close()


def quiet() -> Progress:
    return Progress(tty=False)


def file_requests(server: Server) -> list[str | None]:
    return [rng for path, rng in server.behaviour.requests if path.startswith("/files/")]


def test_https_file_is_fetched_verified_and_recorded(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    result = fetch(f"{server.url}/files/model.nemo", dest, sha256=BLOB_SHA, progress=quiet())
    assert result.downloaded and result.paths == [dest / "model.nemo"]
    assert (dest / "model.nemo").read_bytes() == BLOB
    assert not (dest / PARTIAL_DIR).exists()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["files"] == [{"name": "model.nemo", "size": len(BLOB)}]


def test_second_fetch_is_a_no_op_without_network(server: Server, tmp_path: Path) -> None:
    source = f"{server.url}/files/model.nemo"
    fetch(source, tmp_path / "c", progress=quiet())
    seen = len(server.behaviour.requests)
    again = fetch(source, tmp_path / "c", sha256=BLOB_SHA, progress=quiet())
    assert not again.downloaded and again.paths == [tmp_path / "c" / "model.nemo"]
    assert len(server.behaviour.requests) == seen, "an idempotent fetch must not touch the network"


def test_an_interrupted_transfer_resumes_with_a_range_request(server: Server, tmp_path: Path) -> None:
    server.behaviour.drop_after, server.behaviour.drops_left = 300_000, 2
    result = fetch(f"{server.url}/files/model.nemo", tmp_path / "c", sha256=BLOB_SHA, progress=quiet())
    assert (tmp_path / "c" / "model.nemo").read_bytes() == BLOB and result.downloaded
    assert file_requests(server) == [None, "bytes=300000-", "bytes=600000-"]


def test_a_failed_run_leaves_nothing_at_the_destination_and_the_next_run_resumes(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "c"
    server.behaviour.drop_after, server.behaviour.drops_left = 400_000, 1
    with pytest.raises(TransferFailed, match="run again to resume"):
        fetch(f"{server.url}/files/model.nemo", dest, retries=0, progress=quiet())
    assert not (dest / "model.nemo").exists()
    assert (dest / PARTIAL_DIR / "model.nemo").stat().st_size == 400_000
    fetch(f"{server.url}/files/model.nemo", dest, sha256=BLOB_SHA, progress=quiet())
    assert (dest / "model.nemo").read_bytes() == BLOB
    assert file_requests(server)[-1] == "bytes=400000-"
    assert not (dest / PARTIAL_DIR).exists()


def test_a_server_that_ignores_range_restarts_the_file_cleanly(server: Server, tmp_path: Path) -> None:
    server.behaviour.drop_after, server.behaviour.drops_left = 100_000, 1
    server.behaviour.ignore_range = True
    fetch(f"{server.url}/files/model.nemo", tmp_path / "c", sha256=BLOB_SHA, progress=quiet())
    assert (tmp_path / "c" / "model.nemo").read_bytes() == BLOB


def test_checksum_mismatch_fails_and_cleans_up(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "new-dir"
    with pytest.raises(ChecksumMismatch, match="does not match"):
        fetch(f"{server.url}/files/model.nemo", dest, sha256="0" * 64, progress=quiet())
    assert not dest.exists(), "a directory this run created must be gone after a failure"


def test_checksum_mismatch_keeps_an_existing_directory_but_adds_nothing(
    server: Server, tmp_path: Path
) -> None:
    (tmp_path / "other.txt").write_text("keep me")
    with pytest.raises(ChecksumMismatch):
        fetch(f"{server.url}/files/model.nemo", tmp_path, sha256="f" * 64, progress=quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotFound), (401, AccessDenied), (403, AccessDenied)],
    ids=["404", "401", "403"],
)
def test_http_errors_are_clear_and_leave_nothing(
    server: Server, tmp_path: Path, status: int, error: type[Exception]
) -> None:
    server.behaviour.status["/files/model.nemo"] = status
    with pytest.raises(error, match=str(status)):
        fetch(f"{server.url}/files/model.nemo", tmp_path / "c", progress=quiet())
    assert not (tmp_path / "c").exists()
    assert len(file_requests(server)) == 1, "permanent errors must not be retried"


def test_not_enough_space_is_refused_before_writing(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The free-space probe reports a nearly full volume (a real full disk is not available to tests).
    monkeypatch.setattr(fetch_module, "_free_bytes", lambda _dir: 1000)
    with pytest.raises(NoSpace, match="not enough space"):
        fetch(f"{server.url}/files/model.nemo", tmp_path / "c", progress=quiet())
    assert not (tmp_path / "c").exists()
    assert len(file_requests(server)) == 1, "the size is known from the response headers; no retries"


def test_hugging_face_repo_follows_redirects_and_checks_lfs_sha256(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.behaviour.files = {"README.md": b"# tiny\n", "asr-small.nemo": BLOB[:5000]}
    server.behaviour.drop_after, server.behaviour.drops_left = 1000, 1
    server.behaviour.drop_only = "asr-small.nemo"
    result = fetch("hf://acme/asr-small@main", tmp_path / "c", progress=quiet())
    assert sorted(p.name for p in result.paths) == ["README.md", "asr-small.nemo"]
    assert (tmp_path / "c" / "asr-small.nemo").read_bytes() == BLOB[:5000]
    assert "bytes=1000-" in file_requests(server)


def test_hugging_face_lfs_sha256_mismatch_is_caught(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.behaviour.files = {"README.md": b"# tiny\n", "asr-small.nemo": BLOB[:5000]}
    server.behaviour.corrupt = {"asr-small.nemo"}  # same size, other bytes than the API's sha256
    with pytest.raises(ChecksumMismatch):
        fetch("hf://acme/asr-small", tmp_path / "c", progress=quiet())
    assert not (tmp_path / "c").exists()


def test_ngc_model_version_is_listed_and_fetched(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NGC_ENDPOINT", server.url)
    server.behaviour.files = {"tts_en_tiny.nemo": BLOB[:7000]}
    result = fetch("ngc://nvidia/nemo/tts_en_tiny:1.0", tmp_path / "c", progress=quiet())
    assert result.paths == [tmp_path / "c" / "tts_en_tiny.nemo"]
    assert result.paths[0].read_bytes() == BLOB[:7000]


def test_local_directory_and_bad_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.nemo").write_bytes(b"a" * 10)
    (src / "sub" / "b.txt").write_bytes(b"b")
    result = fetch(str(src), tmp_path / "c", progress=quiet())
    assert sorted(str(p.relative_to(tmp_path / "c")) for p in result.paths) == ["a.nemo", "sub/b.txt"]
    with pytest.raises(NotFound):
        fetch(str(tmp_path / "missing"), tmp_path / "d", progress=quiet())
    with pytest.raises(BadSource, match="unsupported source"):
        fetch("ftp://example/x", tmp_path / "d", progress=quiet())
    with pytest.raises(BadSource, match="version"):
        fetch("ngc://nvidia/nemo/model", tmp_path / "d", progress=quiet())
    with pytest.raises(BadSource, match="single-file"):
        fetch(str(src), tmp_path / "d", sha256=BLOB_SHA, progress=quiet())
    assert not (tmp_path / "d").exists()


def test_progress_is_logged_periodically_off_a_terminal(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubespeech.models.fetch")
    fetch(f"{server.url}/files/model.nemo", tmp_path / "c", progress=Progress(tty=False, interval_s=0.0))
    lines = [r for r in caplog.records if r.getMessage() == "download progress"]
    assert lines and lines[-1].__dict__["bytes_total"] == len(BLOB)
    assert lines[-1].__dict__["bytes_done"] == len(BLOB)


def test_cli_exit_codes_and_output(server: Server, tmp_path: Path) -> None:
    env = dict(os.environ, KUBESPEECH_LOG_LEVEL="WARNING")
    ok = subprocess.run(
        [KUBESPEECH, "model", "fetch", f"{server.url}/files/model.nemo", "--to", str(tmp_path / "c"),
         "--sha256", BLOB_SHA], capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "c" / "model.nemo")
    missing = subprocess.run(
        [KUBESPEECH, "model", "fetch", f"{server.url}/files/nope.nemo", "--to", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 3
    assert "404 Not Found" in missing.stderr
    assert not (tmp_path / "d").exists()
