"""A throwaway PostgreSQL server for tests, so the PostgreSQL code paths run without any setup.

`start_postgres()` runs initdb into a fresh temporary directory and starts a server that listens only on a unix
socket inside it (no TCP, so it cannot clash with or be reached by anything else), with durability turned off for
speed. PostgreSQL refuses to run as root, so under root the server binaries run as the `postgres` user. Set
AUTOTUNE_TEST_PG_URL to use an existing server instead (the `pg_url` fixture in conftest.py does that).
"""
from __future__ import annotations

import atexit
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL

SUPERUSER = "postgres"
DATABASE = "autotune_test"


class PostgresUnavailable(RuntimeError):
    """No server could be started here; the message says why (tests skip with it)."""


@dataclass
class PostgresServer:
    """A running throwaway server; `url` is an SQLAlchemy URL for its test database."""

    root: Path
    bin_dir: Path
    run_as: list[str]
    port: int
    url: str
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Stop the server and delete its directory (safe to call twice)."""
        if self._stopped:
            return
        self._stopped = True
        subprocess.run(_command(self.run_as, [str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                                              "immediate", "-w", "stop"]), capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def find_bin_dir() -> Path:
    """The directory of pg_ctl: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "pg_ctl").exists()]
    if not candidates:
        raise PostgresUnavailable("no PostgreSQL server binaries (pg_ctl) on PATH or in /usr/lib/postgresql: "
                                  "install them with `apt-get install postgresql` (.ci/run does)")
    return max(candidates, key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)] or [0])


def _run_as() -> tuple[list[str], int | None, int | None]:
    """How to run server binaries as a non-root user (a command prefix) and that user's uid/gid (None: as us)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SUPERUSER, "--"], user.pw_uid, user.pw_gid
    su = shutil.which("su")
    if su:  # su takes one shell command line: the prefix ends with "-c" and _command quotes the rest
        return [su, SUPERUSER, "-s", "/bin/sh", "-c"], user.pw_uid, user.pw_gid
    raise PostgresUnavailable("running as root with neither runuser nor su to switch to the 'postgres' user")


def _command(run_as: list[str], command: list[str]) -> list[str]:
    if run_as and run_as[-1] == "-c":
        return run_as + [shlex.join(command)]
    return run_as + command


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check(command: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        if log is not None and log.exists():
            detail += "\n" + log.read_text(errors="replace")[-2000:]
        raise PostgresUnavailable(f"{what} failed (exit {result.returncode}): {detail}")


def start_postgres(database: str = DATABASE) -> PostgresServer:
    """Start a fresh server with an empty `database`; raises PostgresUnavailable when that is impossible here."""
    bin_dir = find_bin_dir()
    run_as, uid, gid = _run_as()
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    try:
        os.chmod(root, 0o700)
        if uid is not None:
            os.chown(root, uid, gid)
        data, log = root / "data", root / "server.log"
        _check(_command(run_as, [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                                 "--encoding=UTF8", "--locale=C", "--no-sync"]), "initdb")
        port = _free_port()
        options = (f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=100")
        _check(_command(run_as, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
                                 "-t", "60", "start"]), "starting postgres", log)
        server = PostgresServer(root=root, bin_dir=bin_dir, run_as=run_as, port=port,
                                url=_url(root, port, database))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    atexit.register(server.stop)  # in case the session dies before the fixture's teardown
    try:
        _check(_command(run_as, [str(bin_dir / "createdb"), "-h", str(root), "-p", str(port), "-U", SUPERUSER,
                                 database]), "createdb")
    except BaseException:
        server.stop()
        raise
    return server


def _url(socket_dir: Path, port: int, database: str) -> str:
    url = URL.create("postgresql+psycopg", username=SUPERUSER, database=database,
                     query={"host": str(socket_dir), "port": str(port)})
    return url.render_as_string(hide_password=False)


if __name__ == "__main__":  # manual use: print a URL, keep the server until Enter
    started = start_postgres()
    print(started.url)
    try:
        input("server running; press Enter to stop it\n")
    finally:
        started.stop()
