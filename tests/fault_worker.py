"""Subprocess body for the fault-injection tests (test_faults.py): `kbsync ARGS` that stops at chosen points.

KBSYNC_TEST_HOLD names the points (comma-separated) and KBSYNC_TEST_FAULT_DIR a directory. The first
time the process reaches a point it creates <dir>/<point>.reached and waits, its thread blocked, until
<dir>/<point>.go exists; the test meanwhile kills the process (SIGKILL, as a power cut would) or breaks
something around it (stops the KB) and lets it go on. Everything else is the real `kbsync`.

Points:
  edit         a changed fact was fetched and its edit is about to start (the poll is mid-way)
  warm         a poll went through (the first one primed the cursor); the retain cache is next
  delta-write  the delta's temp file is half written (Delta.save, before the rename)
  revert       the revert is committed to the audit log; the weights still hold the edit
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

POINTS = {p for p in os.environ.get("KBSYNC_TEST_HOLD", "").split(",") if p}
DIR = Path(os.environ.get("KBSYNC_TEST_FAULT_DIR", "."))
_done: set[str] = set()


def hold(point: str) -> None:
    """At an armed point, the first time: say so and wait for the test's go."""
    if point not in POINTS or point in _done:
        return
    _done.add(point)
    (DIR / f"{point}.reached").write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + 300
    while not (DIR / f"{point}.go").exists():
        if time.monotonic() > deadline:
            sys.exit(f"fault_worker: nobody released {point}")
        time.sleep(0.02)


def arm() -> None:
    import editor.delta
    from kbsync.audit.log import AuditLog
    from kbsync.daemon import Daemon
    from kbsync.edit_engine import Engine

    edit = Engine.edit

    def held_edit(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        hold("edit")
        return edit(self, *args, **kwargs)

    Engine.edit = held_edit

    warm = Daemon._warm

    def held_warm(self):  # noqa: ANN001, ANN202
        hold("warm")
        return warm(self)

    Daemon._warm = held_warm

    save_file = editor.delta.save_file

    def half_then_hold(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        save_file(tensors, filename, metadata=metadata)
        # The retain cache and the statistics are written through the same save_file: only a file in deltas/ counts.
        if "delta-write" in POINTS and "delta-write" not in _done and Path(filename).parent.name == "deltas":
            path = Path(filename)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # what a kill mid-write leaves
            hold("delta-write")
            save_file(tensors, filename, metadata=metadata)

    editor.delta.save_file = half_then_hold

    mark_reverted = AuditLog.mark_reverted

    def held_revert(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        row = mark_reverted(self, *args, **kwargs)
        hold("revert")
        return row

    AuditLog.mark_reverted = held_revert


if __name__ == "__main__":
    arm()
    from kbsync.cli import main

    sys.argv = ["kbsync", *sys.argv[1:]]
    main()
