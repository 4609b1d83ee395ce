"""Audit tables: one `edit` row per attempted or reverted edit, `edit_check` rows for its checks."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

# Status values. 'revert' marks the row written by a revert (it points at the edit it undid
# through reverts_edit_id); the undone edit itself moves to 'reverted'. 'dismiss' marks the row
# written when a person drops an owed KB change (it points at the failed or rejected attempt
# through reverts_edit_id; that attempt keeps its status, so history still says why it failed).
# 'consolidation' marks a row whose one delta replaces the deltas of the applied edits it lists in
# metrics["consolidates"] (they stay 'applied': their facts are still held); a newer consolidation
# of the same base model moves it to 'superseded'. See kbsync/consolidate.py.
STATUSES = ("pending", "applied", "rejected", "noop", "failed", "reverted", "revert", "dismiss", "consolidation",
            "superseded")
SOURCES = ("cli", "daemon", "api")
CHECK_KINDS = ("paraphrase", "retain")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp stored in UTC and always read back timezone-aware, on SQLite and PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: sa.Dialect) -> Optional[datetime]:
        if value is None:
            return None
        # A naive datetime is taken to be UTC already.
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        # SQLite has no time zones and compares timestamps as text: store naive UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: sa.Dialect) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _json(default: Any) -> Any:
    # sa.JSON maps to json on PostgreSQL and to text-with-JSON on SQLite; each field needs its own Column.
    return Field(default_factory=default, sa_column=sa.Column(sa.JSON, nullable=False))


# metrics key (and delta metadata key): the model_fingerprint() of the base model an edit was made for.
BASE_FINGERPRINT = "base_fingerprint"
# metrics key of a consolidation row: the ids of the applied edits its delta stands for.
CONSOLIDATES = "consolidates"


class Edit(SQLModel, table=True):
    """One edit attempt (or revert) with the fact, predictions, metrics, delta and outcome."""

    __tablename__ = "edit"

    id: Optional[int] = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=sa.Column(UTCDateTime, nullable=False, index=True))
    actor: str = ""
    source: str = "cli"
    subject_id: str = Field(default="", index=True)
    subject_label: str = ""
    property: str = Field(default="", index=True)
    object_id: str = ""
    object_label: str = ""
    question: str = ""
    claim: str = ""
    before_answer: str = ""
    after_answer: str = ""
    method: str = ""
    # metrics[BASE_FINGERPRINT]: the base model an applied or rejected edit was made on (its delta's
    # metadata carries it too, and that is what loading checks). A key here, not a column, so logs
    # written before need no migration and still open read-only. Several base models can share one
    # log: each serves the applied rows made for it (AuditLog.applied_in_order(base)).
    metrics: dict[str, Any] = _json(dict)
    thresholds: dict[str, Any] = _json(dict)
    status: str = Field(default="pending", index=True)
    reasons: list[str] = _json(list)
    forced: bool = False
    # Relative to the delta store's root (e.g. "deltas/12.safetensors"), so a data dir can move.
    delta_path: Optional[str] = None
    delta_sha256: Optional[str] = None
    # Fingerprint of the model the delta was computed against (before this edit).
    parent_fingerprint: Optional[str] = None
    kb_revision: str = ""
    # Set on a 'revert' row: the edit it undid; on a 'dismiss' row: the owed attempt it dropped.
    reverts_edit_id: Optional[int] = Field(default=None, foreign_key="edit.id")
    # Set on a 'reverted' edit: the id of the 'revert' row that undid it.
    reverted_by: Optional[int] = Field(default=None, foreign_key="edit.id")
    # Stacking order of applied deltas; assigned when an edit becomes applied, never reused.
    sequence: Optional[int] = Field(default=None, sa_column=sa.Column(sa.Integer, unique=True, nullable=True))

    def made_for(self, base: str) -> bool:
        """Whether this row's edit belongs to base model `base`; a row from before fingerprints names none: every model's."""
        return self.metrics.get(BASE_FINGERPRINT, base) == base

    def as_json(self) -> dict[str, Any]:
        """The row as JSON-ready data (times ISO 8601 in UTC): what the API and `--json` print."""
        return json.loads(self.model_dump_json())


class EditCheck(SQLModel, table=True):
    """One regression check of an edit: a paraphrase of the fact or a retained other fact."""

    __tablename__ = "edit_check"

    id: Optional[int] = Field(default=None, primary_key=True)
    edit_id: Optional[int] = Field(default=None, foreign_key="edit.id", index=True)
    kind: str = "retain"
    prompt: str = ""
    expected: str = ""
    before: str = ""
    after: str = ""
    kl: Optional[float] = None
    ok: bool = False


AUDIT_TABLES = [Edit.__table__, EditCheck.__table__]
