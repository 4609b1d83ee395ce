"""Start and stop a daemon process: `kbsync daemon start` re-executes itself detached and waits for
/health; stop sends SIGTERM and waits; the log's format."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kbsync.config import Settings
from kbsync.daemon.files import DaemonPaths, pid_alive, read_state, running_pid
from kbsync.errors import KbsyncError


def setup_logging(stream: Any = None) -> None:
    """Log lines with a timestamp to stderr (the log file when running in the background)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("kbsync")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # "skipped: maximum number of running instances reached" is the design (max_instances=1), not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def health(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET url/health, or None if it does not answer OK."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            data = json.loads(r.read())
            return data if r.status == 200 and isinstance(data, dict) else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def start_background(settings: Settings, argv: list[str]) -> dict[str, Any]:
    """Re-exec `kbsync daemon start --foreground ARGV` detached; wait until /health answers; its state."""
    paths = DaemonPaths.of(settings)
    pid = running_pid(settings)
    if pid is not None:
        raise KbsyncError(f"a kbsync daemon already runs over {settings.store.data_path} (pid {pid})")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.state.unlink(missing_ok=True)
    with open(paths.log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "kbsync.cli", "daemon", "start", "--foreground", *argv],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd())
    deadline = time.monotonic() + settings.daemon.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KbsyncError(f"the daemon exited during start (code {proc.returncode}): {_last_line(paths.log)}")
        state = read_state(settings)
        if state.get("pid") == proc.pid and state.get("url") and health(state["url"]):
            return state
        time.sleep(0.2)
    proc.terminate()
    raise KbsyncError(f"the daemon did not answer within {settings.daemon.start_timeout:g} s; see {paths.log}")


def stop_daemon(settings: Settings, timeout: float | None = None) -> int | None:
    """SIGTERM the running daemon and wait for it to finish its edit and exit; its pid, or None."""
    pid = running_pid(settings)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + (settings.daemon.stop_timeout if timeout is None else timeout)
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return pid
        time.sleep(0.1)
    raise KbsyncError(f"the daemon (pid {pid}) did not stop within the timeout; it may still be editing")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
