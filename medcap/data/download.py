"""Download ROCOv2 from its Zenodo record (``medcap data download --out DIR``).

The record (doi 10.5281/zenodo.10821435, record id 10821435) lists its files with sizes and MD5
checksums at ``{base_url}/api/records/{record}``. Each file is fetched into ``DIR/<name>.part``,
resumed with an HTTP ``Range`` request after a broken connection (or a killed run), checked for
size and MD5, and only then renamed to ``DIR/<name>``; a file whose checksum is wrong is deleted,
never kept as good. Zip archives are then unpacked, so that ``medcap data prepare DIR`` reads the
release layout directly.

What a record (or a mirror pretending to be one) says is not trusted: every file is written inside
DIR (a key like ``../../x`` or ``/etc/x`` is refused, as zip members that would leave DIR are),
only http(s) addresses are fetched (also after a redirect: no ``file:``, ``ftp:`` or ``data:``),
and a zip is unpacked only if its declared size fits the disk and a sane compression ratio.

Only the standard library (urllib) is used for HTTP; ``base_url`` is configurable for mirrors and
for tests (a local server on loopback).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "https://zenodo.org"

DEFAULT_RECORD = "10821435"  # ROCOv2, doi 10.5281/zenodo.10821435

USER_AGENT = "medcap-download/0.1 (+https://doi.org/10.5281/zenodo.10821435)"

CHUNK = 1 << 20

#: Largest ratio of a zip's declared uncompressed size to its size on disk that is unpacked. The
#: release's zips hold JPEGs (about 1:1) and CSV text (about 1:4); a zip bomb is 1:1000.
MAX_ZIP_RATIO = 100

_URL_SCHEMES = ("http", "https")


class DownloadError(RuntimeError):
    """A download failed for good; the message says which file, why, and what to do."""


class ChecksumError(DownloadError):
    """A downloaded file does not match the record's size or MD5 checksum."""


@dataclass
class RemoteFile:
    """One file of the record."""

    key: str
    """File name in the record, e.g. ``train_images.zip``."""
    url: str
    size: int | None
    md5: str | None


_RETRYABLE = (
    urllib.error.URLError,
    http.client.HTTPException,  # IncompleteRead, RemoteDisconnected, BadStatusLine ...
    ConnectionError,
    TimeoutError,
    socket.timeout,
)


def unreachable(e: BaseException, url: str) -> str | None:
    """Why the host of ``url`` cannot be reached at all, when retrying cannot help (its name does not
    resolve: no network or no DNS; the network is down; the connection is refused), else None."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    host = urllib.parse.urlsplit(url).hostname or url
    fix = (
        "medcap data download needs the internet: run it on a machine that has it and copy the folder "
        "here, or pass --base-url for a reachable mirror of the Zenodo record"
    )
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host {host} ({reason.strerror or reason}): this machine is offline or has no DNS. {fix}"
    if isinstance(reason, ConnectionRefusedError):
        return f"{host} refused the connection ({reason.strerror or reason}). {fix}"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"no route to {host} ({reason.strerror or reason}): the network is down. {fix}"
    return None


def check_url(url: str, what: str) -> str:
    """``url`` if it is an http(s) address with a host, else ``DownloadError`` naming ``what``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in _URL_SCHEMES or not parts.netloc:
        raise DownloadError(
            f"{what}: {url!r} is not an http(s) address; medcap downloads only over http(s) "
            "(check --base-url, or the record is not a Zenodo record)"
        )
    return url


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) addresses (urllib's own handler also follows ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        check_url(newurl, f"a redirect from {req.full_url}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks only http(s): no file:, ftp: or data: handlers at all."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _open(url: str, timeout: float, headers: dict[str, str] | None = None) -> Any:
    check_url(url, "download")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return _http_opener().open(req, timeout=timeout)


def destination(out: Path, key: str) -> Path:
    """Where the file ``key`` goes: inside ``out``, or ``DownloadError`` (``../x``, ``/etc/x``,
    ``C:\\x`` and anything that resolves outside, as zip members are checked)."""
    out_r = out.resolve()
    dest = (out / key).resolve()
    if (
        not key
        or "\\" in key
        or Path(key).is_absolute()
        or re.match(r"^[A-Za-z]:", key)
        or out_r not in dest.parents
    ):
        raise DownloadError(
            f"the record lists a file named {key!r}, which would be written outside {out}; refusing to "
            "download it (a record's file names must be plain names)"
        )
    return dest


def _is_retryable_http(e: urllib.error.HTTPError) -> bool:
    return e.code in (408, 425, 429) or e.code >= 500


def _sleep(attempt: int, backoff: float) -> None:
    if backoff > 0:
        time.sleep(min(backoff * 2**attempt, 60.0))


def record_url(base_url: str, record: str) -> str:
    """The REST API address that lists the record's files."""
    return f"{base_url.rstrip('/')}/api/records/{record}"


def parse_record(meta: dict[str, Any], api_url: str) -> list[RemoteFile]:
    """Files of a Zenodo record JSON: the current API (``files: [{key, size, checksum: 'md5:..',
    links: {self|content}}]``), the InvenioRDM files endpoint (``entries``) and the legacy API
    (``filename``, ``filesize``, ``links.download``) are all understood."""
    files = meta.get("files")
    if isinstance(files, dict):
        files = files.get("entries", [])
        if isinstance(files, dict):
            files = list(files.values())
    if not isinstance(files, list) or not files:
        raise DownloadError(f"{api_url}: the record lists no files (is the record id right?)")
    out: list[RemoteFile] = []
    for f in files:
        key = f.get("key") or f.get("filename")
        if not key:
            continue
        links = f.get("links") or {}
        link = links.get("content") or links.get("download") or links.get("self")
        if not link:
            link = f"{api_url}/files/{urllib.parse.quote(key)}/content"
        elif re.search(r"/api/records/[^/]+/files/[^/]+$", link) and "content" not in links:
            link += "/content"  # InvenioRDM: files/<key> is the metadata, files/<key>/content the bytes
        checksum = f.get("checksum") or ""
        md5 = checksum.split(":", 1)[1] if checksum.startswith("md5:") else (checksum or None)
        size = f.get("size", f.get("filesize"))
        url = check_url(urllib.parse.urljoin(api_url, link), f"{api_url}: the link of {key!r}")
        out.append(RemoteFile(key=key, url=url, size=size, md5=md5))
    return out


def fetch_record(
    base_url: str = DEFAULT_BASE_URL,
    record: str = DEFAULT_RECORD,
    timeout: float = 60,
    retries: int = 5,
    backoff: float = 1.0,
) -> list[RemoteFile]:
    """List the record's files from the REST API (bounded retries on network errors)."""
    url = check_url(record_url(base_url, record), "--base-url")
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            with _open(url, timeout, {"Accept": "application/json"}) as r:
                return parse_record(json.loads(r.read().decode("utf-8")), url)
        except urllib.error.HTTPError as e:
            if not _is_retryable_http(e):
                raise DownloadError(
                    f"{url}: HTTP {e.code} {e.reason}; check --base-url and --record"
                ) from None
            last = e
        except _RETRYABLE as e:
            why = unreachable(e, url)
            if why is not None:  # six tries with back-off took a minute to say the same
                raise DownloadError(f"{url}: {why}") from None
            last = e
        except json.JSONDecodeError as e:
            raise DownloadError(f"{url}: the answer is not JSON ({e}); check --base-url") from None
        _sleep(attempt, backoff)
    raise DownloadError(f"{url}: cannot list the record's files after {retries + 1} tries: {last}")


def md5_of(path: Path) -> str:
    """MD5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verified_marker(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.verified")


def _is_verified(dest: Path, rf: RemoteFile) -> bool:
    marker = _verified_marker(dest)
    if not (dest.is_file() and marker.is_file()):
        return False
    try:
        rec = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = dest.stat()
    return (
        rec.get("md5") == rf.md5 and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
    )


def download_file(
    rf: RemoteFile,
    out: Path,
    *,
    retries: int = 5,
    timeout: float = 60,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch one file into ``out`` with resume, then check size and MD5.

    The bytes go to ``<name>.part``; each try asks for the missing tail with ``Range: bytes=N-``
    (a server answering 200 instead of 206 restarts the file). At most ``retries + 1`` tries.
    A size or checksum mismatch deletes the part file and raises ``ChecksumError``.
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    dest = destination(out, rf.key)
    check_url(rf.url, rf.key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _is_verified(dest, rf):
        return dest
    if dest.is_file() and rf.md5 and md5_of(dest) == rf.md5:  # complete from an earlier run
        _mark_verified(dest, rf)
        return dest
    part = dest.with_name(dest.name + ".part")
    bar = tqdm(
        total=rf.size,
        initial=0,
        desc=rf.key,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
    )
    last: Exception | None = None
    try:
        for attempt in range(retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if rf.size is not None and have > rf.size:
                part.unlink()
                have = 0
            if rf.size is not None and have == rf.size:
                break
            bar.n = have
            bar.refresh()
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with _open(rf.url, timeout, headers) as r:
                    status = r.status
                    if have and status == 200:  # server ignored Range: start over
                        have = 0
                        bar.n = 0
                    elif have and status == 206:
                        start = _content_range_start(r.headers.get("Content-Range"))
                        if start != have:
                            raise DownloadError(
                                f"{rf.url}: asked for bytes from {have}, server sent from {start}"
                            )
                    with part.open("ab" if have else "wb") as fh:
                        while True:
                            block = r.read(CHUNK)
                            if not block:
                                break
                            fh.write(block)
                            bar.update(len(block))
                got = part.stat().st_size
                if rf.size is None or got >= rf.size:
                    break
                last = ConnectionError(f"connection closed after {got:,} of {rf.size:,} bytes")
            except urllib.error.HTTPError as e:
                if e.code == 416 and rf.size is not None and have >= rf.size:
                    break
                if e.code == 416:  # our part file is not a prefix the server recognises
                    part.unlink(missing_ok=True)
                    last = e
                elif not _is_retryable_http(e):
                    raise DownloadError(f"{rf.key}: HTTP {e.code} {e.reason} from {rf.url}") from None
                else:
                    last = e
            except _RETRYABLE as e:
                last = e  # the host answered the listing a moment ago: retried (and resumed)
            _sleep(attempt, backoff)
        else:
            raise DownloadError(
                f"{rf.key}: download incomplete after {retries + 1} tries ({last}); the partial file "
                f"{part} is kept, run the same command again to resume"
            )
    finally:
        bar.close()

    size = part.stat().st_size if part.exists() else 0
    if rf.size is not None and size != rf.size:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{rf.key}: got {size:,} bytes, the record says {rf.size:,}; deleted {part}")
    if rf.md5:
        got_md5 = md5_of(part)
        if got_md5 != rf.md5:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{rf.key}: MD5 {got_md5} does not match the record's {rf.md5}; the file was deleted "
                "(not kept as good). Run again to download it afresh; if it fails again, the mirror "
                "serves a different file than the record lists."
            )
    os.replace(part, dest)
    _mark_verified(dest, rf)
    return dest


def _mark_verified(dest: Path, rf: RemoteFile) -> None:
    st = dest.stat()
    _verified_marker(dest).write_text(
        json.dumps({"md5": rf.md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    )


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def unpack_zip(path: Path, out: Path) -> Path:
    """Unpack a zip into ``out``. A split's image zip (``train_images.zip``) whose members are not
    in a folder goes into ``out/train/`` so the release layout results. Members whose path would
    leave ``out`` are refused. A marker file makes a second call a no-op."""
    marker = out / f".{path.name}.unpacked"
    if marker.is_file():
        return out
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            top = {n.split("/", 1)[0] for n in names}
            flat = all("/" not in n for n in names)
            target = out
            stem = path.stem
            if flat and stem.endswith("_images"):
                target = out / stem[: -len("_images")]
            target_r = target.resolve()
            for n in names:
                dest = (target / n).resolve()
                if target_r not in dest.parents and dest != target_r:
                    raise DownloadError(
                        f"{path}: member {n!r} would be written outside {target}; refusing to unpack"
                    )
            _check_unpacked_size(path, infos, out)
            target.mkdir(parents=True, exist_ok=True)
            z.extractall(target)  # each member stops at its declared size (zipfile's own bound)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise DownloadError(
            f"{path}: not a complete, readable zip archive ({e}); the record's checksum matched, so the "
            "record itself lists a damaged file: try another mirror (--base-url), or report it to the "
            "dataset's maintainers"
        ) from None
    marker.write_text(json.dumps({"files": len(names), "folders": sorted(top)[:10]}))
    return target


def _check_unpacked_size(path: Path, infos: list[zipfile.ZipInfo], out: Path) -> None:
    """Refuse a zip whose declared contents are out of proportion to it, or do not fit the disk."""
    declared = sum(i.file_size for i in infos)
    on_disk = max(1, path.stat().st_size)
    if declared > MAX_ZIP_RATIO * on_disk:
        raise DownloadError(
            f"{path}: declares {declared:,} bytes of contents in {on_disk:,} bytes ({declared / on_disk:,.0f}:1; "
            f"at most {MAX_ZIP_RATIO}:1 is unpacked): a zip bomb, not a dataset archive"
        )
    free = shutil.disk_usage(out).free
    if declared > free:
        raise DownloadError(
            f"{path}: unpacking needs {declared / 2**30:,.1f} GiB and {out} has {free / 2**30:,.1f} GiB "
            "free; free some space (or pass --no-unpack and unpack elsewhere)"
        )


def download_rocov2(
    out: str | Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    record: str = DEFAULT_RECORD,
    files: list[str] | None = None,
    unpack: bool = True,
    delete_zips: bool = False,
    retries: int = 5,
    timeout: float = 60,
    backoff: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Download (resumable, checksummed) and unpack the ROCOv2 release into ``out``.

    ``files`` are glob patterns on the record's file names (default: all). Returns a summary with
    each file's state. Raises ``DownloadError`` (or ``ChecksumError``) naming the file at fault.
    """
    out = Path(out)
    remote = fetch_record(base_url, record, timeout=timeout, retries=retries, backoff=backoff)
    if files:
        chosen = [rf for rf in remote if any(fnmatch.fnmatch(rf.key, pat) for pat in files)]
        if not chosen:
            names = ", ".join(rf.key for rf in remote)
            raise DownloadError(f"no file of record {record} matches {files}; the record has: {names}")
        remote = chosen
    summary: dict[str, Any] = {
        "record": record,
        "api": record_url(base_url, record),
        "out": str(out),
        "files": {},
    }
    for rf in remote:
        dest = download_file(rf, out, retries=retries, timeout=timeout, backoff=backoff, progress=progress)
        entry: dict[str, Any] = {
            "path": str(dest),
            "size": dest.stat().st_size,
            "md5": rf.md5,
            "verified": bool(rf.md5),
        }
        if unpack and dest.suffix.lower() == ".zip":
            entry["unpacked_to"] = str(unpack_zip(dest, out))
            if delete_zips:
                dest.unlink()
                entry["deleted_zip"] = True
        summary["files"][rf.key] = entry
    (out / "download.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
