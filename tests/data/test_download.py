"""`medcap data download` against a fake Zenodo record served on loopback (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from medcap.cli import main
from medcap.data.download import (
    ChecksumError,
    DownloadError,
    download_file,
    download_rocov2,
    parse_record,
    unpack_zip,
)
from medcap.data.prepare import prepare_dataset


def make_zip() -> bytes:
    """A tiny release: valid/ images in a zip (the way the record ships them)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # stored: the size is large enough to cut
        for i in range(3):
            im = Image.fromarray((rng.random((120, 160)) * 255).astype("uint8"))
            b = io.BytesIO()
            im.save(b, "JPEG", quality=95)
            z.writestr(f"ROCOv2_2023_valid_{i:06d}.jpg", b.getvalue())
    return buf.getvalue()


CAPTIONS = "ID,Caption\n" + "".join(f"ROCOv2_2023_valid_{i:06d},Chest X-ray number {i}\n" for i in range(3))


class FakeZenodo:
    """Serves /api/records/<id> and /files/<key> with Range support; can cut a transfer short."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}
        self.cut_once: set[str] = set()  # keys whose next transfer stops half way
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                if self.path == "/api/records/123":
                    base = f"http://127.0.0.1:{outer.port}"
                    body = json.dumps(
                        {
                            "id": 123,
                            "files": [
                                {
                                    "key": k,
                                    "size": len(v),
                                    "checksum": f"md5:{outer.md5[k]}",
                                    "links": {"self": f"{base}/files/{k}"},
                                }
                                for k, v in outer.files.items()
                            ],
                        }
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                key = self.path.removeprefix("/files/")
                if key not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[key]
                start = 0
                rng = self.headers.get("Range")
                if rng and not outer.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                payload = data[start:]
                if key in outer.cut_once:
                    outer.cut_once.discard(key)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return  # the connection drops mid-file: Content-Length promised more
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeZenodo:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def zenodo():
    with FakeZenodo({"valid_images.zip": make_zip(), "valid_captions.csv": CAPTIONS.encode()}) as z:
        yield z


def content_requests(z: FakeZenodo, key: str) -> list[str | None]:
    return [r for p, r in z.requests if p == f"/files/{key}"]


def test_download_unpack_and_prepare(zenodo, tmp_path):
    out = tmp_path / "rocov2"
    summary = download_rocov2(out, base_url=zenodo.base_url, record="123", backoff=0, progress=False)
    assert set(summary["files"]) == {"valid_images.zip", "valid_captions.csv"}
    assert all(f["verified"] for f in summary["files"].values())
    assert sorted(p.name for p in (out / "valid").iterdir())[0] == "ROCOv2_2023_valid_000000.jpg"
    assert not list(out.glob("*.part"))
    st = prepare_dataset(out, tmp_path / "prep", progress=False, workers=1, color_policy="all")["valid"]
    assert st["kept"] == 3 and st["skipped"] == 0
    # a second run re-uses verified files: no file content is fetched again
    zenodo.requests.clear()
    download_rocov2(out, base_url=zenodo.base_url, record="123", backoff=0, progress=False)
    assert content_requests(zenodo, "valid_images.zip") == []


def test_broken_connection_resumes_with_range(zenodo, tmp_path):
    zenodo.cut_once.add("valid_images.zip")
    out = tmp_path / "dl"
    download_rocov2(out, base_url=zenodo.base_url, record="123", backoff=0, progress=False, unpack=False)
    reqs = content_requests(zenodo, "valid_images.zip")
    size = len(zenodo.files["valid_images.zip"])
    assert reqs[0] is None and reqs[1] == f"bytes={size // 2}-"  # second try asks only for the rest
    assert (out / "valid_images.zip").read_bytes() == zenodo.files["valid_images.zip"]


def test_resume_from_part_file_of_a_killed_run(zenodo, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    data = zenodo.files["valid_images.zip"]
    (out / "valid_images.zip.part").write_bytes(data[:1000])
    download_rocov2(out, base_url=zenodo.base_url, record="123", files=["*.zip"], backoff=0, progress=False)
    assert content_requests(zenodo, "valid_images.zip") == ["bytes=1000-"]
    assert (out / "valid_images.zip").read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(zenodo, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    data = zenodo.files["valid_images.zip"]
    (out / "valid_images.zip.part").write_bytes(data[:1000])
    zenodo.ignore_range = True  # answers 200 with the whole file
    download_rocov2(out, base_url=zenodo.base_url, record="123", files=["*.zip"], backoff=0, progress=False)
    assert (out / "valid_images.zip").read_bytes() == data


def test_wrong_checksum_is_a_clear_error_and_not_kept(zenodo, tmp_path, capsys):
    zenodo.md5["valid_captions.csv"] = "0" * 32  # the record lists another checksum than served
    out = tmp_path / "dl"
    with pytest.raises(ChecksumError) as e:
        download_rocov2(
            out,
            base_url=zenodo.base_url,
            record="123",
            files=["valid_captions.csv"],
            backoff=0,
            progress=False,
        )
    assert "valid_captions.csv" in str(e.value) and "0" * 32 in str(e.value) and "deleted" in str(e.value)
    assert not (out / "valid_captions.csv").exists() and not (out / "valid_captions.csv.part").exists()
    rc = main(
        [
            "data",
            "download",
            "--out",
            str(out),
            "--base-url",
            zenodo.base_url,
            "--record",
            "123",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "MD5" in err and "Traceback" not in err


def test_gives_up_after_bounded_retries(zenodo, tmp_path):
    """A connection that always breaks: a clear error after retries + 1 tries, part file kept."""
    out = tmp_path / "dl"

    class Always(set):
        def __contains__(self, k):
            return True

        def discard(self, k):
            pass

    zenodo.cut_once = Always()
    with pytest.raises(DownloadError) as e:
        download_rocov2(
            out, base_url=zenodo.base_url, record="123", files=["*.zip"], retries=2, backoff=0, progress=False
        )
    assert "after 3 tries" in str(e.value) and "resume" in str(e.value)
    assert len(content_requests(zenodo, "valid_images.zip")) == 3
    assert (out / "valid_images.zip.part").stat().st_size > 0
    assert not (out / "valid_images.zip").exists()


def test_unknown_record_and_pattern(zenodo, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_rocov2(tmp_path, base_url=zenodo.base_url, record="999", backoff=0, progress=False)
    with pytest.raises(DownloadError, match="the record has: valid_images.zip"):
        download_rocov2(
            tmp_path, base_url=zenodo.base_url, record="123", files=["nope*"], backoff=0, progress=False
        )


def test_parse_record_formats():
    api = "https://zenodo.org/api/records/10821435"
    new = {
        "files": [
            {
                "key": "a.zip",
                "size": 3,
                "checksum": "md5:abc",
                "links": {"self": f"{api}/files/a.zip/content"},
            }
        ]
    }
    rdm = {
        "files": {
            "entries": {
                "a.zip": {
                    "key": "a.zip",
                    "size": 3,
                    "checksum": "md5:abc",
                    "links": {"self": f"{api}/files/a.zip"},
                }
            }
        }
    }
    legacy = {
        "files": [
            {"filename": "a.zip", "filesize": 3, "checksum": "abc", "links": {"download": "https://x/a.zip"}}
        ]
    }
    for meta, url in (
        (new, f"{api}/files/a.zip/content"),
        (rdm, f"{api}/files/a.zip/content"),
        (legacy, "https://x/a.zip"),
    ):
        (rf,) = parse_record(meta, api)
        assert (rf.key, rf.size, rf.md5, rf.url) == ("a.zip", 3, "abc", url)
    with pytest.raises(DownloadError, match="no files"):
        parse_record({"files": []}, api)


def test_unpack_refuses_paths_outside(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        unpack_zip(evil, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()


def test_download_file_skips_complete_file_from_earlier_run(zenodo, tmp_path):
    from medcap.data.download import fetch_record

    (rf,) = [f for f in fetch_record(zenodo.base_url, "123", backoff=0) if f.key == "valid_captions.csv"]
    tmp_path.joinpath("valid_captions.csv").write_bytes(CAPTIONS.encode())
    zenodo.requests.clear()
    assert download_file(rf, tmp_path, progress=False) == tmp_path / "valid_captions.csv"
    assert zenodo.requests == []


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("http://medcap-no-such-host.invalid", "cannot resolve the host medcap-no-such-host.invalid"),
        ("http://127.0.0.1:{port}", "127.0.0.1 refused the connection"),
    ],
)
def test_offline_fails_within_seconds_naming_the_host(tmp_path, capsys, base_url, message):
    """Offline, six tries with back-off took 63 s to say 'Name or service not known'."""
    import socket
    import time

    from medcap.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    rc = main(["data", "download", "--out", str(tmp_path / "dl"), "--base-url", base_url.format(port=port)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "--base-url" in err
    assert time.perf_counter() - t0 < 10
