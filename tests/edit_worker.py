"""Subprocess body for the crash test: `kbsync ...` that dies (SIGKILL) just before an edit is marked applied."""

from __future__ import annotations

import os
import signal
import sys

from kbsync.audit.log import AuditLog

_update_status = AuditLog.update_status


def _die_before_applied(self, edit_id, status, **fields):
    # At this point the pending row and the delta file exist; the flip to 'applied' has not happened.
    if status == "applied":
        os.kill(os.getpid(), signal.SIGKILL)
    return _update_status(self, edit_id, status, **fields)


if __name__ == "__main__":
    AuditLog.update_status = _die_before_applied
    from kbsync.cli import main

    sys.argv = ["kbsync", *sys.argv[1:]]
    main()
