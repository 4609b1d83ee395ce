"""The watcher's cursor in the audit database (table sync_cursor), so it survives restarts."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlmodel import Field, Session, SQLModel

from kbsync.audit.log import AuditError, AuditLog, create_tables
from kbsync.audit.models import UTCDateTime, utcnow
from kbsync.kb.watch import Cursor


class SyncCursor(SQLModel, table=True):
    """One named cursor: the Watcher's JSON, and when it was last committed."""

    __tablename__ = "sync_cursor"

    name: str = Field(primary_key=True)
    cursor: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=sa.Column(UTCDateTime, nullable=False))


class CursorStore:
    """Load and save Watcher cursors by name in the audit log's database."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        try:
            create_tables(audit.engine, [SyncCursor.__table__])
        except sa_exc.SQLAlchemyError as e:
            raise AuditError(f"cannot create sync_cursor in {audit.url}: {type(e).__name__}") from None

    def load(self, name: str) -> Cursor | None:
        """The stored cursor, or None if this name has none yet."""
        with Session(self.audit.engine) as s:
            row = s.get(SyncCursor, name)
            return Cursor.from_json(row.cursor) if row is not None else None

    def save(self, name: str, cursor: Cursor) -> None:
        """Store the cursor (insert or replace) in one transaction."""
        with Session(self.audit.engine) as s:
            row = s.get(SyncCursor, name) or SyncCursor(name=name)
            row.cursor = cursor.to_json()
            row.updated_at = utcnow()
            s.add(row)
            s.commit()

    def info(self, name: str) -> dict[str, object] | None:
        """A summary for `daemon status`: mode, slots and revisions known, latest modified, update time."""
        with Session(self.audit.engine) as s:
            row = s.get(SyncCursor, name)
            if row is None:
                return None
            c = Cursor.from_json(row.cursor)
            return {"name": name, "mode": c.mode, "slots": len(c.values), "entities": len(c.revisions),
                    "modified": c.modified.isoformat() if c.modified else None,
                    "updated_at": row.updated_at.isoformat(timespec="seconds")}
