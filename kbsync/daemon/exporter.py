"""The daemon's Hugging Face export of the served model, kept current in a thread (kbsync.export)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kbsync.config import Settings
from kbsync.daemon.files import now_iso
from kbsync.errors import KbsyncError

log = logging.getLogger("kbsync.daemon")


class Exporter:
    """Keeps [serve].export_dir a kbsync export of the served model, on a thread of its own.

    A listener of the served model: every applied edit and every rebuild (a revert, another
    process's change taken in by a sync) marks the export stale, and the thread writes it again
    from the live weights while holding the engine's edit lock (edits and reverts wait; generation
    does not, as nothing changes the weights under that lock). Edits that land during an export
    make one more. After each export the reload command runs (outside the lock; the next export
    waits for it). A failed export or reload is logged, never fatal: the previous export stays.
    At start an export that already holds the served edits on the same base model is kept.
    """

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.dir = Path(settings.serve.export_dir).expanduser()
        self.reload = settings.serve.export_reload.strip()
        self.reload_timeout = settings.serve.export_reload_timeout
        self.engine = engine
        self._stale = threading.Event()
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None
        self.exports = 0
        self.last_export: str | None = None
        self.last_error = ""
        self.last_reload: dict[str, Any] | None = None
        self.edits: list[int] = []

    # The served model's listener interface (kbsync.served.ServedModel.add_listener).
    def on_reset(self) -> None:
        """The weights were rebuilt (a revert, or another process's change): the export is stale."""
        self._stale.set()

    def on_applied(self, edit_id: int, delta: Any) -> None:
        """An edit was applied: the export is stale."""
        self._stale.set()

    def start(self) -> Exporter:
        """Listen to the served model (its history replayed marks the export stale once) and start the thread."""
        self.engine.pipeline.load_served_model().add_listener(self)
        self._thread = threading.Thread(target=self._run, name="kbsync-export", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish the export (and reload command) in progress, start no other."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """Nothing stale and nothing being written or reloaded."""
        return not self._stale.is_set() and not self._busy.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._stale.wait(0.2) or self._stop.is_set():
                continue
            self._busy.set()
            try:
                self._stale.clear()
                self.export()
            finally:
                self._busy.clear()

    def export(self) -> bool:
        """Write the export if it does not hold the served edits already, then run the reload command; True if written."""
        from kbsync.export import read_manifest, write_export

        try:
            with self.engine.edit_lock:
                served = self.engine.pipeline.load_served_model()
                ids = list(served.edit_ids)
                current = read_manifest(self.dir)
                if (current is not None and current.get("base_fingerprint") == served.base_fingerprint
                        and [e.get("id") for e in current.get("edits") or []] == ids):
                    if self.last_export is None:
                        log.info("export: %s already holds the served model (%d edit(s))", self.dir, len(ids))
                    self.edits = ids
                    return False
                rows = [self.engine.pipeline.audit.get(i) for i in ids]
                result = write_export(served, rows, self.dir, base_model=getattr(served.adapter, "name", ""))
        except KbsyncError as e:
            self.last_error = str(e)
            log.error("export to %s failed (the previous export stays): %s", self.dir, e)
            return False
        except Exception as e:
            self.last_error = f"internal error: {type(e).__name__}: {e}"
            log.exception("export to %s crashed (the previous export stays)", self.dir)
            return False
        self.exports += 1
        self.last_export, self.last_error, self.edits = result.exported_at, "", ids
        log.info("exported the served model (%d edit(s), weights %s) to %s in %.1f s", len(ids),
                 result.weights_fingerprint, self.dir, result.seconds)
        self.run_reload(result)
        return True

    def run_reload(self, result: Any) -> None:
        """The reload command, killed with everything it started after the timeout; failures only logged."""
        if not self.reload:
            return
        env = {**os.environ, "KBSYNC_EXPORT_DIR": str(result.path),
               "KBSYNC_EXPORT_EDITS": ",".join(str(e.id) for e in result.edits),
               "KBSYNC_EXPORT_FINGERPRINT": result.weights_fingerprint}
        started = time.monotonic()
        try:
            # Its own process group, so a timeout kills the shell's children too (they hold its output pipe).
            proc = subprocess.Popen(self.reload, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        except OSError as e:
            self.last_reload = {"at": now_iso(), "ok": False, "error": str(e)}
            log.error("export reload command could not start: %s", e)
            return
        try:
            out, _ = proc.communicate(timeout=self.reload_timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            timed_out = True
        seconds = time.monotonic() - started
        last = (out or "").strip().splitlines()[-1:] or [""]
        ok = not timed_out and proc.returncode == 0
        self.last_reload = {"at": now_iso(), "ok": ok, "exit": None if timed_out else proc.returncode,
                            "seconds": round(seconds, 1), "output": last[0][:500]}
        if timed_out:
            log.error("export reload command timed out after %g s and was killed: %s", self.reload_timeout, self.reload)
        elif proc.returncode != 0:
            log.error("export reload command exited %d after %.1f s: %s", proc.returncode, seconds, last[0])
        else:
            log.info("export reload command done in %.1f s", seconds)

    def summary(self) -> dict[str, Any]:
        """Export fields for /health and state.json."""
        return {"dir": str(self.dir), "exports": self.exports, "last_export": self.last_export,
                "edits": list(self.edits), "error": self.last_error, "reload": self.last_reload}
