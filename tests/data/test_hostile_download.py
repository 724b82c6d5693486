"""`medcap data download` against a hostile record served on loopback: file names that leave --out,
links and redirects to file: addresses, a damaged zip whose checksum matches, a zip bomb."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medcap.cli import main
from medcap.data.download import DownloadError, download_rocov2, parse_record, unpack_zip

PAYLOAD = b"ID,Caption\nROCOv2_2023_valid_000000,an axial CT\n"


class HostileRecord:
    """Serves /api/records/1 (a record whose entries the test writes), /files/<name> and a redirect."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.blobs: dict[str, bytes] = {"payload": PAYLOAD}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/api/records/1":
                    body = json.dumps({"files": outer.entries}).encode()
                elif self.path == "/redirect-to-ftp":
                    self.send_response(302)
                    self.send_header("Location", "ftp://127.0.0.1/etc/hostname")  # urllib follows ftp:
                    self.end_headers()
                    return
                elif self.path.startswith("/files/") and self.path[7:] in outer.blobs:
                    body = outer.blobs[self.path[7:]]
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def entry(self, key: str, link: str, blob: str = "payload") -> dict:
        data = self.blobs[blob]
        return {
            "key": key,
            "size": len(data),
            "checksum": f"md5:{hashlib.md5(data).hexdigest()}",
            "links": {"self": link},
        }


@pytest.fixture
def record() -> Iterator[HostileRecord]:
    r = HostileRecord()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.mark.parametrize("key", ["../../escaped.csv", "ABSOLUTE", "sub/../../escaped.csv", "..\\escaped.csv"])
def test_a_file_name_that_leaves_out_is_refused(record: HostileRecord, tmp_path: Path, key: str) -> None:
    """The old downloader wrote ``../../x`` (and an absolute path) where it pointed, with its
    ``.verified`` marker."""
    out = tmp_path / "a" / "b" / "out"
    if key == "ABSOLUTE":
        key = str(tmp_path / "escaped.csv")
    record.entries = [record.entry(key, f"{record.base}/files/payload")]
    with pytest.raises(DownloadError, match="outside"):
        download_rocov2(out, base_url=record.base, record="1", backoff=0, progress=False)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written


def test_file_links_and_redirects_are_not_followed(record: HostileRecord, tmp_path: Path) -> None:
    """``links.content: file:///etc/hostname`` was copied by the old downloader."""
    record.entries = [record.entry("hostname", "file:///etc/hostname")]
    with pytest.raises(DownloadError, match="not an http"):
        download_rocov2(tmp_path / "out", base_url=record.base, record="1", backoff=0, progress=False)
    record.entries = [record.entry("hostname", f"{record.base}/redirect-to-ftp")]
    with pytest.raises(DownloadError, match="not an http"):
        download_rocov2(tmp_path / "out", base_url=record.base, record="1", backoff=0, progress=False)
    assert not (tmp_path / "out" / "hostname").exists()
    with pytest.raises(DownloadError, match="--base-url"):
        download_rocov2(tmp_path / "out", base_url="file:///etc", record="1", backoff=0, progress=False)
    with pytest.raises(DownloadError, match="not an http"):
        parse_record(
            {"files": [{"key": "x", "links": {"content": "ftp://example.org/x"}}]}, "https://z/api/records/1"
        )


def test_plain_keys_and_subfolders_inside_out_still_download(record: HostileRecord, tmp_path: Path) -> None:
    record.entries = [
        record.entry("valid_captions.csv", f"{record.base}/files/payload"),
        record.entry("extra/notes.csv", f"{record.base}/files/payload"),
    ]
    summary = download_rocov2(tmp_path / "out", base_url=record.base, record="1", backoff=0, progress=False)
    assert (tmp_path / "out" / "valid_captions.csv").read_bytes() == PAYLOAD
    assert (tmp_path / "out" / "extra" / "notes.csv").read_bytes() == PAYLOAD
    assert all(e["verified"] for e in summary["files"].values())


def test_a_damaged_zip_whose_checksum_matches_is_a_clear_error(
    record: HostileRecord, tmp_path: Path, capsys
) -> None:
    """The record lists a truncated zip (its MD5 is of the truncated bytes, so it verifies): the old
    downloader died with zipfile's BadZipFile traceback."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("valid/a.jpg", b"\xff\xd8" + bytes(range(256)) * 40)
    record.blobs["cut"] = buf.getvalue()[: len(buf.getvalue()) // 2]
    record.entries = [record.entry("valid_images.zip", f"{record.base}/files/cut", blob="cut")]
    with pytest.raises(DownloadError, match="not a complete, readable zip"):
        download_rocov2(tmp_path / "out", base_url=record.base, record="1", backoff=0, progress=False)
    rc = main(
        ["data", "download", "--out", str(tmp_path / "cli"), "--base-url", record.base, "--record", "1"]
    )
    assert rc != 0 and "Traceback" not in capsys.readouterr().err


def test_a_zip_bomb_is_not_unpacked(tmp_path: Path) -> None:
    bomb = tmp_path / "valid_images.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("a.jpg", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(64):  # 64 MiB of zeros: about 64 KB zipped
                f.write(block)
    with pytest.raises(DownloadError, match="zip bomb"):
        unpack_zip(bomb, tmp_path / "out")
    assert not (tmp_path / "out" / "valid" / "a.jpg").exists()
