"""Subprocess body for the store tests: concurrent commits, and a crash in the middle of an edit."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from editor.delta import Delta
from kbsync.audit import AuditLog, Edit
from kbsync.store import DeltaStore


def wait_for(path: Path, timeout: float = 60.0) -> None:
    """Block until a file appears (the parent's start signal)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting for {path}")
        time.sleep(0.01)


def main(mode: str, url: str, root: str, arg: str = "") -> None:
    audit = AuditLog.open(url)
    store = DeltaStore(root, lock_timeout=60)
    delta = Delta({"layer.weight": torch.randn(8, 8)}, {"pid": os.getpid()})
    if mode == "commit":
        n, go = arg.split(":", 1)
        Path(f"{go}.ready.{os.getpid()}").touch()
        wait_for(Path(go))
        held = []
        for i in range(int(n)):
            # The outer lock (re-entrant with commit's own) lets us log when we held it.
            with store.lock():
                start = time.monotonic()
                store.commit(audit, Edit(actor=f"worker-{os.getpid()}", source="daemon", subject_label=f"S{i}"), delta)
                held.append(f"{start} {time.monotonic()}")
            # Work outside the lock (as the pipeline's model check would) lets the other worker in.
            time.sleep(0.1)
        Path(f"{go}.held.{os.getpid()}").write_text("\n".join(held))
    elif mode in ("crash-after-delta", "crash-mid-delta", "crash-before-delta"):
        with store.lock():
            row = audit.record(Edit(actor="crasher", subject_label="Peru", status="pending"))
            if mode == "crash-after-delta":
                store.save(delta, row.id)
            elif mode == "crash-mid-delta":
                # What a kill during Delta.save leaves: the first half of the temp file it writes
                # (<name>.safetensors.tmp) before renaming it to <name>.safetensors.
                from safetensors.torch import save

                data = save(delta.tensors)
                final = store.resolve(store.relative(row.id))
                final.parent.mkdir(parents=True, exist_ok=True)
                final.with_suffix(final.suffix + ".tmp").write_bytes(data[:len(data) // 2])
            # Die as a power cut would: no cleanup, no finally blocks, lock released by the OS.
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(*sys.argv[1:])
