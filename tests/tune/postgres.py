"""A throwaway PostgreSQL server for the distributed-study tests: a fresh cluster in a temporary
folder on a free port, trust authentication on 127.0.0.1 only, stopped and deleted afterwards.

PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` system user
(Debian's package creates it) and its commands run through ``runuser``. Debian keeps the server
binaries in /usr/lib/postgresql/<version>/bin, off PATH; scripts/install-system-deps.sh installs
the ``postgresql`` package when they are missing."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures import free_port, skip_missing


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yields its URL (``postgresql://postgres@127.0.0.1:PORT/postgres``)."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        skip_missing(
            "PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql; "
            "scripts/install-system-deps.sh does it)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_missing("psycopg is not installed: pip install 'medcap[tune]'")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            skip_missing("running as root and there is no 'postgres' user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="medcap-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()
    try:
        subprocess.run(
            [*run_as, initdb, "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").is_file() else ""
        out = getattr(e, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        skip_missing(
            f"could not start a PostgreSQL server: {e}; {out.decode(errors='replace')[-500:]} {log[-500:]}"
        )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=120
        )
        shutil.rmtree(root, ignore_errors=True)
