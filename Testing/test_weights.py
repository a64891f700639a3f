"""Model registry and downloads against a real HTTP server on 127.0.0.1 started by the test.

The server honours Range requests itself and can be told to cut the connection half-way through the
first response, so resume is exercised over a real socket, not a mock.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from FoBSegmentLib import weights
from FoBSegmentLib.paths import resources_dir

PAYLOAD = bytes((i * 7919 + (i >> 8)) % 256 for i in range(300_000))


class Server:
    """Serves PAYLOAD at /w.bin; `cut_first` drops the first response after `cut_at` bytes."""

    def __init__(self, cut_first: bool = False, cut_at: int = 120_000) -> None:
        self.cut_first, self.cut_at = cut_first, cut_at
        self.requests: list[str | None] = []  # the Range header of each request
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                if self.path != "/w.bin":
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m.group(1)) if m else 0
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_first and len(outer.requests) == 1:
                    self.wfile.write(body[: outer.cut_at])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies mid-file
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/w.bin"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_registry(tmp_path: Path, url: str, sha256: str | None = None, size: int | None = len(PAYLOAD),
                   md5: str | None = None) -> Path:
    path = tmp_path / "models.json"
    entry = {"name": "test-model", "file": "w.bin", "url": url, "size": size,
             "sha256": sha256 if sha256 is not None else hashlib.sha256(PAYLOAD).hexdigest(), "md5": md5,
             "licence": "test", "segmenter": "sam-vit-b", "feeds": "tests"}
    path.write_text(json.dumps({"models": [entry]}))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_shipped_registry_is_complete():
    registry = weights.load_registry(resources_dir() / "models.json")
    for name in ("sam-vit-h", "sam-vit-l", "sam-vit-b"):
        e = registry[name]
        assert e.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/") and e.size > 3e8
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.segmenter == name and e.licence
    assert registry["medsam"].segmenter == "medsam" and (registry["medsam"].sha256 or registry["medsam"].md5)
    lite = registry["fob-lite"]
    assert lite.shipped and lite.file == "fob_lite.safetensors" and lite.url is None
    assert weights.model_path(lite) == resources_dir() / "fob_lite.safetensors"


def test_download_success_then_offline_reuse(tmp_path, cache, monkeypatch):
    with Server() as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url)))
        path = weights.download("test-model", progress=False)
        assert srv.requests == [None]
    assert path == cache / "weights" / "w.bin" and path.read_bytes() == PAYLOAD
    assert not list(path.parent.glob("*.part"))
    # the server is gone: a verified file in the cache needs no network
    assert weights.download("test-model", progress=False) == path
    assert weights.verify("test-model") == (True, f"size and SHA-256 verified ({path})")
    assert weights.checkpoint_for("sam-vit-b") == path


def test_resume_after_a_cut_connection(tmp_path, cache, monkeypatch):
    with Server(cut_first=True) as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url)))
        with pytest.raises(weights.DownloadError, match="run again to resume") as err:
            weights.download("test-model", progress=False, retries=0)
        assert srv.url in str(err.value) and "--sam-checkpoint PATH" in str(err.value)
        part = cache / "weights" / "w.bin.part"
        assert 0 < part.stat().st_size < len(PAYLOAD)
        kept = part.stat().st_size
        path = weights.download("test-model", progress=False, retries=0)
        assert srv.requests == [None, f"bytes={kept}-"]
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_automatic_retry_resumes_in_one_call(tmp_path, cache, monkeypatch):
    with Server(cut_first=True, cut_at=50_000) as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url)))
        path = weights.download("test-model", progress=False, retries=2)
        assert srv.requests[0] is None and srv.requests[1] == "bytes=50000-"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(PAYLOAD).hexdigest()


def test_checksum_mismatch_leaves_nothing(tmp_path, cache, monkeypatch):
    with Server() as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url, sha256="0" * 64)))
        with pytest.raises(weights.ChecksumError, match="SHA-256"):
            weights.download("test-model", progress=False)
    assert list((cache / "weights").iterdir()) == []
    assert weights.checkpoint_for("sam-vit-b") is None


def test_md5_only_entries_are_checked_by_md5(tmp_path, cache, monkeypatch):
    with Server() as srv:
        reg = write_registry(tmp_path, srv.url, sha256="", size=None, md5="f" * 32)
        monkeypatch.setenv("FOB_MODELS_JSON", str(reg))
        with pytest.raises(weights.ChecksumError, match="MD5"):
            weights.download("test-model", progress=False)
        reg = write_registry(tmp_path, srv.url, sha256="", size=None, md5=hashlib.md5(PAYLOAD).hexdigest())
        assert weights.download("test-model", progress=False).read_bytes() == PAYLOAD


def test_offline_error_names_the_url_and_the_manual_route(tmp_path, cache, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    url = f"http://127.0.0.1:{port}/w.bin"
    monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, url)))
    with pytest.raises(weights.DownloadError) as err:
        weights.download("test-model", progress=False, retries=1, timeout=5)
    message = str(err.value)
    assert url in message and "--sam-checkpoint PATH" in message and "\n" not in message
    assert not (cache / "weights" / "w.bin").exists()


def test_http_errors_and_unknown_names(tmp_path, cache, monkeypatch):
    with Server() as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url.replace("w.bin", "nope"))))
        with pytest.raises(weights.DownloadError, match="HTTP 404"):
            weights.download("test-model", progress=False)
    with pytest.raises(ValueError, match="unknown model 'sam-vit-x'"):
        weights.download("sam-vit-x", progress=False)


def test_cache_dir_argument_overrides_the_environment(tmp_path, cache, monkeypatch):
    other = tmp_path / "elsewhere"
    with Server() as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url)))
        path = weights.download("test-model", other, progress=False)
    assert path == other / "weights" / "w.bin" and not cache.exists()
    assert weights.find_local("test-model", other) == path and weights.find_local("test-model") is None
