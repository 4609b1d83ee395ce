"""The delta store: edit deltas as safetensors files under a data directory, with a cross-process lock."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock

from editor.delta import Delta, DeltaError, sha256_file
from kbsync.audit.log import AuditLog
from kbsync.audit.models import Edit, EditCheck, utcnow
from kbsync.errors import KbsyncError

DEFAULT_LOCK_TIMEOUT = 60.0
SUFFIX = ".safetensors"


class StoreLocked(KbsyncError):
    """Another process holds the delta store's lock for longer than we are willing to wait."""


class CommitFailed(KbsyncError):
    """An edit's delta could not be written (a full disk, a failing device); `edit` is its row, now 'failed'."""

    def __init__(self, message: str, edit: Edit) -> None:
        super().__init__(message)
        self.edit = edit


class DeltaStore:
    """Deltas at root/deltas/<name>.safetensors; root/store.lock serialises edits between processes."""

    def __init__(self, root: str | Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.root = Path(root).expanduser()
        self.deltas_dir = self.root / "deltas"
        self.orphans_dir = self.root / "orphans"
        self.lock_path = self.root / "store.lock"
        self.lock_timeout = lock_timeout
        self._lock: filelock.FileLock | None = None

    @classmethod
    def for_settings(cls, settings: Any) -> DeltaStore:
        """The store of settings' data dir, waiting store.lock_timeout for its lock (every process alike)."""
        return cls(settings.store.data_path, lock_timeout=settings.store.lock_timeout)

    def __repr__(self) -> str:
        return f"DeltaStore({str(self.root)!r})"

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the store lock (re-entrant within this object); StoreLocked after timeout seconds."""
        timeout = self.lock_timeout if timeout is None else timeout
        if self._lock is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = filelock.FileLock(str(self.lock_path))
        try:
            self._lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise StoreLocked(
                f"delta store {self.root} is busy: another kbsync process holds {self.lock_path} "
                f"(waited {timeout:g} s)"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def relative(self, name: int | str) -> str:
        """The delta_path recorded for a delta name: relative to the root, so the root can move."""
        return f"deltas/{name}{SUFFIX}"

    def resolve(self, delta_path: str) -> Path:
        """The file a recorded delta_path refers to (relative paths are under the root)."""
        p = Path(delta_path)
        return p if p.is_absolute() else self.root / p

    def save(self, delta: Delta, name: int | str | None = None) -> tuple[str, str]:
        """Write a delta (temp file + rename) as <name or a uuid>.safetensors; returns (delta_path, sha256)."""
        rel = self.relative(uuid.uuid4().hex if name is None else name)
        sha = delta.save(self.resolve(rel))
        return rel, sha

    def load(self, edit: Edit) -> Delta:
        """The edit's delta, verified against its recorded sha256; DeltaError names the edit."""
        if not edit.delta_path or not edit.delta_sha256:
            raise DeltaError(f"edit {edit.id}: no delta recorded")
        try:
            return Delta.load(self.resolve(edit.delta_path), sha256=edit.delta_sha256)
        except DeltaError as e:
            raise DeltaError(f"edit {edit.id}: {e}") from None

    def commit(self, audit: AuditLog, edit: Edit, delta: Delta, checks: Iterable[EditCheck] = (),
               finish: Callable[[int, str, str], Edit] | None = None) -> Edit:
        """Run the edit protocol under the lock: pending row, delta file, flip to applied (with sequence).

        finish(row_id, delta_path, sha256), when given, is the flip instead (a consolidation's, which
        supersedes the previous one in the same transaction).

        A delta that cannot be written (DeltaError: a full disk, a failing device; no partial file is
        left) marks the row 'failed' with the reason at once and raises CommitFailed carrying it.
        """
        with self.lock():
            edit.status = "pending"
            edit.sequence = None
            row = audit.record(edit, checks)
            try:
                rel, sha = self.save(delta, row.id)
            except DeltaError as e:
                # Nothing of the edit is in the store: the row says so now, not at the next start's repair
                # (until then it would read as an edit in flight). If even that write fails, the repair does it.
                failed = audit.update_status(row.id, "failed", reasons=[*row.reasons, str(e)])
                raise CommitFailed(f"edit {row.id}: {e}", failed) from None
            if finish is not None:
                return finish(row.id, rel, sha)
            return audit.update_status(row.id, "applied", delta_path=rel, delta_sha256=sha)

    def verify(self, audit: AuditLog) -> list[Edit]:
        """Check every stacked delta (edits, consolidations) exists and matches its sha256; returns the rows in order."""
        applied = audit.stack_in_order()
        for edit in applied:
            if not edit.delta_path or not edit.delta_sha256:
                raise DeltaError(f"edit {edit.id}: applied but has no delta recorded")
            path = self.resolve(edit.delta_path)
            if not path.exists():
                raise DeltaError(f"edit {edit.id}: delta file {path} is missing")
            if sha256_file(path) != edit.delta_sha256:
                raise DeltaError(f"edit {edit.id}: delta file {path} does not match its recorded sha256")
        return applied

    def _to_orphans(self, path: Path) -> Path:
        self.orphans_dir.mkdir(parents=True, exist_ok=True)
        dest = self.orphans_dir / path.name
        if dest.exists():
            # Keep earlier orphans: a second crash may leave a file of the same name.
            dest = self.orphans_dir / f"{path.name}.{utcnow():%Y%m%dT%H%M%S%f}"
        path.replace(dest)
        return dest

    def reconcile(self, audit: AuditLog) -> list[str]:
        """Repair what a crash mid-edit leaves: fail 'pending' rows, move unreferenced delta files to orphans/."""
        done: list[str] = []
        with self.lock():
            # Holding the lock, no edit is in flight, so any pending row is from a dead process.
            for edit in reversed(audit.history(status="pending", limit=None)):
                path = self.resolve(edit.delta_path or self.relative(edit.id))
                # Delta.save writes <name>.safetensors.tmp and renames it: a kill -9 mid-write leaves that.
                partial = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p.name.endswith(".tmp")
                                 and p.is_file()) if path.parent.is_dir() else []
                if path.exists() and edit.delta_sha256 and sha256_file(path) != edit.delta_sha256:
                    why = "interrupted; its delta does not match the recorded sha256"
                elif path.exists():
                    # Written but never confirmed applied: roll back rather than trust it.
                    why = "interrupted after writing its delta, before it was applied"
                elif partial:
                    why = "interrupted while writing its delta"
                else:
                    why = "interrupted before its delta was written"
                audit.update_status(edit.id, "failed", reasons=[*edit.reasons, why])
                line = f"edit {edit.id}: pending -> failed ({why})"
                if path.exists():
                    line += f"; moved {path.name} to {self._to_orphans(path)}"
                for tmp in partial:
                    line += f"; moved partial {tmp.name} to {self._to_orphans(tmp)}"
                done.append(line)
            if self.deltas_dir.is_dir():
                referenced = {self.resolve(p).resolve() for p in audit.delta_paths()}
                for path in sorted(self.deltas_dir.iterdir()):
                    if not path.is_file():
                        continue
                    if path.name.endswith(".tmp"):  # any temp file: no process writes while we hold the lock
                        done.append(f"partial delta {path.name} moved to {self._to_orphans(path)}")
                    elif path.suffix == SUFFIX and path.resolve() not in referenced:
                        done.append(f"delta {path.name} has no audit row; moved to {self._to_orphans(path)}")
        return done
