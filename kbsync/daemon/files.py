"""The daemon's files under <data_dir>/daemon: pid, log, state.json, the API token and the lock, and
who holds them."""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kbsync.config import Settings

log = logging.getLogger("kbsync.daemon")


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class DaemonPaths:
    """Where a daemon over one data directory keeps its files."""

    root: Path

    @classmethod
    def of(cls, settings: Settings) -> DaemonPaths:
        """The paths for the settings' data directory."""
        return cls(settings.store.data_path / "daemon")

    @property
    def pid(self) -> Path:
        """The running daemon's pid."""
        return self.root / "daemon.pid"

    @property
    def log(self) -> Path:
        """The background daemon's log."""
        return self.root / "daemon.log"

    @property
    def state(self) -> Path:
        """JSON: url, port, last poll, errors, in-flight fact."""
        return self.root / "state.json"

    @property
    def token(self) -> Path:
        """The generated API token (when daemon.token is empty)."""
        return self.root / "token"

    @property
    def lock(self) -> Path:
        """Held for the daemon's lifetime: one daemon per data directory."""
        return self.root / "daemon.lock"


def api_token(settings: Settings, create: bool = False) -> str:
    """daemon.token, else the generated token file (made, mode 600, when create); '' if none."""
    if settings.daemon.token:
        return settings.daemon.token
    path = DaemonPaths.of(settings).token
    try:
        return path.read_text().strip()
    except OSError:
        if not create:
            return ""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_state(settings: Settings) -> dict[str, Any]:
    """The daemon's state file ({} if none or unreadable)."""
    try:
        data = json.loads(DaemonPaths.of(settings).state.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def running_pid(settings: Settings) -> int | None:
    """The pid of the daemon running over these settings' data directory, or None."""
    try:
        pid = int(DaemonPaths.of(settings).pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def daemon_holding(settings: Settings) -> int | None:
    """The pid of a daemon over this data directory, whether or not its API answers yet; else None."""
    pid = running_pid(settings)
    if pid is None:
        return None
    # After a kill -9 the pid file stays and its pid may be reused: the daemon's lock tells.
    # Probed only then, so a daemon starting right now rarely finds the lock taken by this probe.
    lock = FileLock(str(DaemonPaths.of(settings).lock))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return pid
    except OSError:  # cannot open the lock file (read-only data dir): trust the live pid
        return pid
    lock.release()
    return None
