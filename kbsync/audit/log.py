"""The audit log: every edit kbsync attempts, with its outcome, in SQLite or PostgreSQL.

Edit protocol (the pipeline holds DeltaStore.lock() across all of it, so sequence numbers
and the pending -> applied flip never interleave between processes):

1. ``audit.record(Edit(status="pending", ...), checks)`` writes the attempt and gets its id.
2. ``store.save(delta, edit.id)`` writes ``deltas/<id>.safetensors`` (temp file + rename)
   and returns its path and sha256.
3. ``audit.update_status(id, "applied", delta_path=..., delta_sha256=...)`` flips the row in
   one transaction and assigns the next ``sequence`` (the order deltas stack on the base).
4. The live model applies the delta. Rejected/noop/failed edits are recorded with that
   status instead and get no sequence.

A crash between 1 and 3 leaves a 'pending' row (and maybe a delta file); on start,
``DeltaStore.reconcile(audit)`` marks such rows 'failed' and moves their files to orphans/,
so the model rebuilt from ``applied_in_order()`` never contains an unconfirmed edit.

Revert protocol: ``audit.mark_reverted(id, actor)`` (only for an 'applied' edit), in one
transaction, writes a new row with status 'revert' whose ``reverts_edit_id`` is the undone
edit, and sets the undone edit's status to 'reverted' and its ``reverted_by`` to the new
row's id. History therefore shows both the edit and its revert. The undone edit keeps its
sequence and delta file (for the record) but leaves ``applied_in_order()``; the caller
rebuilds or removes the delta from the live model. A revert row has no sequence.

Owed KB changes: a fact slot (subject, property) is owed while the daemon's newest attempt at it
'failed' or was 'rejected' and nothing settled it since: an edit of the slot to that target that
was applied (possibly reverted later) or found the model already answering it ('noop'), a later
daemon attempt that did either (the KB moved on), or a 'dismiss' row written by
``audit.mark_dismissed(id, actor)``. Owed state is derived from the rows (``audit.owed()``), so it
needs no column of its own, survives restarts, and every retry is an ordinary attempt row.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, SQLModel, col, func, select

from kbsync.audit.models import AUDIT_TABLES, CHECK_KINDS, CONSOLIDATES, SOURCES, STATUSES, Edit, EditCheck
from kbsync.errors import BadInput, KbsyncError, NotFound

PG_CONNECT_TIMEOUT = 5
SQLITE_BUSY_TIMEOUT = 30
# Retries when two writers without the store lock pick the same sequence number.
SEQUENCE_RETRIES = 5


class AuditError(KbsyncError):
    """The audit database cannot be opened, read or written."""


def mask_url(url: str | sa.URL) -> str:
    """The URL with any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # Not parseable as a URL: hide anything between "user:" and "@" by hand.
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _reason(e: BaseException) -> str:
    """One short line from a driver error ("connection refused", 'database "x" does not exist')."""
    orig = getattr(e, "orig", None) or e
    if isinstance(orig, OSError) and orig.strerror:
        where = f": {orig.filename}" if orig.filename else ""
        return f"{orig.strerror[:1].lower()}{orig.strerror[1:]}{where}"
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    text = lines[0] if lines else type(orig).__name__
    # psycopg: 'connection failed: connection to server at "h", port 1 failed: Connection refused'
    if "failed: " in text:
        text = text.rsplit("failed: ", 1)[1]
    text = re.sub(r"^(FATAL|ERROR):\s+", "", text)
    return text[:1].lower() + text[1:]


def _normalise_url(url: str) -> sa.URL:
    try:
        u = make_url(url)
    except sa_exc.ArgumentError:
        raise BadInput(f"audit log URL {mask_url(url)!r} is not a database URL (e.g. sqlite:///path/audit.db)") from None
    # Plain postgresql:// means psycopg2 to SQLAlchemy; kbsync ships psycopg 3.
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    return u


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan"
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON for the audit log's JSON columns: a non-finite float (a rejected edit's KL) is stored as a string.

    Python writes Infinity/NaN, which is not JSON: PostgreSQL refuses it and other SQLite readers choke.
    """
    return json.dumps(_finite_json(value), allow_nan=False)


def _engine(u: sa.URL) -> Engine:
    args: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql":
        if "connect_timeout" not in u.query:
            args["connect_timeout"] = PG_CONNECT_TIMEOUT
        return sa.create_engine(u, connect_args=args, pool_pre_ping=True, json_serializer=json_dumps)
    if u.get_backend_name() == "sqlite":
        # Wait for another process's write instead of failing with "database is locked".
        args["timeout"] = SQLITE_BUSY_TIMEOUT
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(u, connect_args=args, json_serializer=json_dumps)


def _empty_engine() -> Engine:
    """An empty audit log in memory: what a reader sees where nothing has been recorded yet."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False})
    SQLModel.metadata.create_all(engine, tables=AUDIT_TABLES)
    return engine


def _read_only_engine(u: sa.URL) -> Engine:
    """An engine that never writes: a SQLite file opened with mode=ro, or an empty log if there is none yet."""
    db = u.database
    if u.get_backend_name() == "sqlite" and db and db != ":memory:" and not db.startswith("file:"):
        path = Path(db).expanduser().resolve()
        if not path.is_file():
            return _empty_engine()
        uri = f"file:{quote(str(path))}?mode=ro"
        # The SQLAlchemy URL cannot say mode=ro for a plain path, so the connection is made here.
        return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(
            uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT, check_same_thread=False))
    if u.get_backend_name() == "postgresql":
        # The server refuses writes on these sessions; the URL may already carry options (search_path).
        options = f"{u.query.get('options', '')} -c default_transaction_read_only=on".strip()
        u = u.update_query_dict({"options": options})
    engine = _engine(u)
    if not sa.inspect(engine).has_table(Edit.__tablename__):
        engine.dispose()
        return _empty_engine()
    return engine


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise BadInput(f"unknown edit status {status!r}; known: {', '.join(STATUSES)}")


# Rows whose delta stacks (in sequence order): edits, and the consolidations that replace some of them.
STACKED = ("applied", "consolidation")
# An attempt with one of these statuses leaves its KB change owed ...
OWING = ("failed", "rejected")
# ... until one of these settles the slot (see the module docstring).
SETTLED = ("applied", "noop", "reverted")


def _same_target(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


@dataclass(frozen=True)
class Owed:
    """A KB change the served model does not answer yet: the daemon's newest attempt at its slot."""

    edit: Edit
    # Failed or rejected attempts at this target in a row, the newest included.
    attempts: int
    # Ids of the slot's unsettled daemon attempts (any target), oldest first: what may be dismissed.
    run: tuple[int, ...] = field(default=())

    def next_retry(self, base: float, cap: float) -> datetime:
        """When the next attempt is due: base * 2^(attempts-1) seconds after the newest one, at most cap."""
        delay = min(cap, base * 2.0 ** min(self.attempts - 1, 64))
        return self.edit.created_at + timedelta(seconds=delay)


# Arbitrary 64-bit key of the advisory lock that serialises table creation on PostgreSQL.
_SCHEMA_LOCK = 0x6B6273796E63


def create_tables(engine: Engine, tables: list) -> None:
    """CREATE TABLE IF NOT EXISTS, safe when several processes open a fresh database at once.

    Checking and creating are separate statements, so two creators can both find a table
    missing: on PostgreSQL they take a transaction-scoped advisory lock first, on a SQLite
    file a lock file beside it.
    """
    db = engine.url.database
    if engine.dialect.name == "sqlite" and db and db != ":memory:" and not db.startswith("file:"):
        from filelock import FileLock

        with FileLock(str(Path(db).expanduser()) + ".schema.lock", timeout=SQLITE_BUSY_TIMEOUT):
            SQLModel.metadata.create_all(engine, tables=tables)
        return
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        SQLModel.metadata.create_all(conn, tables=tables)


class AuditLog:
    """The edit log in a SQL database; open it with AuditLog.open(url)."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    @classmethod
    def open(cls, url: str, read_only: bool = False) -> AuditLog:
        """Connect, create the tables if missing, and fail with one line if the database does not answer.

        read_only: create nothing (no directory, table or lock file) and write nothing, so a
        read-only data directory can still be read; a log that does not exist yet reads as empty.
        """
        shown = mask_url(url)
        u = _normalise_url(url)
        try:
            if read_only:
                engine = _read_only_engine(u)
                # Connect now, so a database that does not answer fails here with one line.
                with engine.connect():
                    pass
                return cls(engine, shown)
            engine = _engine(u)
            create_tables(engine, AUDIT_TABLES)
        except (sa_exc.SQLAlchemyError, OSError, ImportError) as e:
            raise AuditError(f"cannot open audit log {shown}: {_reason(e)}") from None
        return cls(engine, shown)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({self.url!r})"

    @contextmanager
    def _session(self) -> Iterator[Session]:
        # expire_on_commit=False: rows handed back stay readable after the session closes.
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s
        # InternalError: PostgreSQL refusing a write in a read-only session (AuditLog.open(read_only=True)).
        except (sa_exc.OperationalError, sa_exc.InternalError) as e:
            raise AuditError(f"audit log {self.url}: {_reason(e)}") from None

    def _with_sequence_retry(self, work: Any) -> Any:
        # Under the store lock the first try always wins; the retry covers lock-free writers.
        for attempt in range(SEQUENCE_RETRIES):
            try:
                with self._session() as s:
                    return work(s)
            except sa_exc.IntegrityError as e:
                if attempt == SEQUENCE_RETRIES - 1 or "sequence" not in str(e.orig).lower():
                    raise AuditError(f"audit log {self.url}: {_reason(e)}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _next_sequence(s: Session) -> int:
        current = s.exec(select(func.max(Edit.sequence))).one()
        return (current or 0) + 1

    def next_sequence(self) -> int:
        """The sequence number the next applied edit will get (sequences are never reused)."""
        with self._session() as s:
            return self._next_sequence(s)

    def record(self, edit: Edit, checks: Iterable[EditCheck] = ()) -> Edit:
        """Insert an edit and its checks in one transaction; applied edits get the next sequence."""
        _check_status(edit.status)
        if edit.source not in SOURCES:
            raise BadInput(f"unknown edit source {edit.source!r}; known: {', '.join(SOURCES)}")
        checks = list(checks)
        for c in checks:
            if c.kind not in CHECK_KINDS:
                raise BadInput(f"unknown check kind {c.kind!r}; known: {', '.join(CHECK_KINDS)}")
        wants_sequence = edit.status in STACKED and edit.sequence is None

        def work(s: Session) -> Edit:
            row = Edit.model_validate(edit.model_dump())
            if wants_sequence:
                row.sequence = self._next_sequence(s)
            s.add(row)
            s.flush()  # assigns row.id for the checks
            for c in checks:
                s.add(EditCheck.model_validate({**c.model_dump(exclude={"id"}), "edit_id": row.id}))
            s.commit()
            return row

        row = self._with_sequence_retry(work)
        # Hand the caller's object its id and sequence too, as an ORM add would.
        edit.id, edit.sequence, edit.created_at = row.id, row.sequence, row.created_at
        return row

    def update_status(self, edit_id: int, status: str, **fields: Any) -> Edit:
        """Set an edit's status and any other columns; becoming 'applied' (or 'consolidation') assigns a sequence."""
        _check_status(status)
        unknown = set(fields) - set(Edit.model_fields) | ({"id"} & set(fields))
        if unknown:
            raise TypeError(f"update_status() got unknown or read-only fields: {', '.join(sorted(unknown))}")

        def work(s: Session) -> Edit:
            row = self._get(s, edit_id)
            for k, v in fields.items():
                setattr(row, k, v)
            row.status = status
            if status in STACKED and row.sequence is None:
                row.sequence = self._next_sequence(s)
            s.add(row)
            s.commit()
            return row

        return self._with_sequence_retry(work)

    @staticmethod
    def _get(s: Session, edit_id: int) -> Edit:
        row = s.get(Edit, edit_id)
        if row is None:
            raise NotFound(f"no edit with id {edit_id}")
        return row

    def get(self, edit_id: int) -> Edit:
        """The edit with this id, or NotFound."""
        with self._session() as s:
            return self._get(s, edit_id)

    def checks(self, edit_id: int) -> list[EditCheck]:
        """The edit's regression checks in the order they were recorded."""
        with self._session() as s:
            self._get(s, edit_id)
            return list(s.exec(select(EditCheck).where(EditCheck.edit_id == edit_id).order_by(col(EditCheck.id))))

    def history(
        self,
        status: str | Sequence[str] | None = None,
        subject: str | None = None,
        property: str | None = None,
        since: datetime | None = None,
        limit: int | None = 50,
        batch: str | None = None,
    ) -> list[Edit]:
        """Edits newest first; subject matches the label (any case) or the id; batch: metrics.batch; limit=None for all."""
        q = select(Edit)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            for st in wanted:
                _check_status(st)
            q = q.where(col(Edit.status).in_(wanted))
        if subject:
            q = q.where(sa.or_(func.lower(Edit.subject_label) == subject.lower(), Edit.subject_id == subject))
        if property:
            q = q.where(Edit.property == property)
        if since is not None:
            q = q.where(col(Edit.created_at) >= since)
        if batch:
            q = q.where(col(Edit.metrics)["batch"].as_string() == batch)
        # Ids grow with insertion, so they order correctly even when writers' clocks disagree.
        q = q.order_by(col(Edit.id).desc())
        if limit is not None:
            q = q.limit(limit)
        with self._session() as s:
            return list(s.exec(q))

    def applied_in_order(self, base: str | None = None) -> list[Edit]:
        """Applied edits in the order their deltas stack; with base, only those of that base model."""
        with self._session() as s:
            rows = list(s.exec(select(Edit).where(Edit.status == "applied").order_by(col(Edit.sequence))))
        # A row from before fingerprints were recorded names no model: it stays every model's, as it
        # was, and loading its delta still checks the shapes (ServedModel.check_fits).
        return rows if base is None else [e for e in rows if e.made_for(base)]

    def stack_in_order(self, base: str | None = None, leaving: int | None = None) -> list[Edit]:
        """The rows whose deltas the served model stacks, in order: each active consolidation, then the
        applied edits none of them stands for; with base, only those of that base model; leaving: as
        if that row were reverted (a reverted consolidation's edits stack one by one again)."""
        with self._session() as s:
            rows = list(s.exec(select(Edit).where(col(Edit.status).in_(STACKED)).order_by(col(Edit.sequence))))
        rows = [e for e in rows if e.id != leaving]
        if base is not None:
            rows = [e for e in rows if e.made_for(base)]
        covered = {i for e in rows if e.status == "consolidation" for i in e.metrics.get(CONSOLIDATES, [])}
        return [e for e in rows if e.id not in covered]

    def consolidation(self, base: str) -> Edit | None:
        """The active consolidation row of base model `base`, if any."""
        with self._session() as s:
            rows = list(s.exec(select(Edit).where(Edit.status == "consolidation").order_by(col(Edit.sequence))))
        rows = [e for e in rows if e.made_for(base)]
        return rows[-1] if rows else None

    def finish_consolidation(self, row_id: int, delta_path: str, delta_sha256: str, reverts: Sequence[int] = (),
                             actor: str = "", source: str = "cli", reason: str = "") -> Edit:
        """In one transaction: the pending consolidation row becomes the active one (sequence, delta), the
        previous active one of its base model 'superseded', and each edit of `reverts` reverted."""

        def work(s: Session) -> Edit:
            row = self._get(s, row_id)
            base = row.metrics.get("base_fingerprint", "")
            for old in s.exec(select(Edit).where(Edit.status == "consolidation")):
                if old.made_for(base):
                    old.status = "superseded"
                    old.metrics = {**old.metrics, "superseded_by": row_id}
                    s.add(old)
            for edit_id in reverts:
                self._revert(s, self._get(s, edit_id), actor, source, reason)
            row.status, row.delta_path, row.delta_sha256 = "consolidation", delta_path, delta_sha256
            row.sequence = self._next_sequence(s)
            s.add(row)
            s.commit()
            return row

        return self._with_sequence_retry(work)

    def delta_paths(self) -> set[str]:
        """Every delta_path any edit row refers to (whatever its status)."""
        with self._session() as s:
            return {p for p in s.exec(select(Edit.delta_path).where(col(Edit.delta_path).is_not(None)))}

    def owed(self, subject_id: str | None = None, property: str | None = None) -> list[Owed]:
        """KB changes still owed (oldest first), optionally of one slot; see the module docstring."""
        daemon = sa.and_(Edit.source == "daemon", col(Edit.status).in_(OWING + SETTLED), Edit.subject_id != "")
        if subject_id is not None:
            daemon = sa.and_(daemon, Edit.subject_id == subject_id)
        if property is not None:
            daemon = sa.and_(daemon, Edit.property == property)
        newest = (select(func.max(Edit.id).label("id")).where(daemon)
                  .group_by(Edit.subject_id, Edit.property).subquery())
        with self._session() as s:
            candidates = list(s.exec(select(Edit).join(newest, Edit.id == newest.c.id)
                                     .where(col(Edit.status).in_(OWING)).order_by(col(Edit.id))))
            if not candidates:
                return []
            # One narrow read of every row of those slots (subject_id is indexed), judged below.
            slots = {(e.subject_id, e.property) for e in candidates}
            rows = [r for r in s.exec(select(Edit.id, Edit.subject_id, Edit.property, Edit.source, Edit.status,
                                             Edit.object_label)
                                      .where(col(Edit.subject_id).in_(sorted({sid for sid, _ in slots})))
                                      .order_by(col(Edit.id))) if (r.subject_id, r.property) in slots]
        out = []
        for cand in candidates:
            mine = [r for r in rows if (r.subject_id, r.property) == (cand.subject_id, cand.property)]
            if any(r.id > cand.id and (r.status == "dismiss" or (r.status in SETTLED and
                                                                 _same_target(r.object_label, cand.object_label)))
                   for r in mine):
                continue
            run: list[Any] = []
            for r in reversed([r for r in mine if r.id <= cand.id]):
                if r.status == "dismiss" or (r.status in SETTLED and (
                        r.source == "daemon" or _same_target(r.object_label, cand.object_label))):
                    break
                if r.source == "daemon" and r.status in OWING:
                    run.append(r)
            attempts = 0
            for r in run:  # newest first
                if not _same_target(r.object_label, cand.object_label):
                    break
                attempts += 1
            out.append(Owed(cand, attempts, tuple(r.id for r in reversed(run))))
        return out

    def mark_dismissed(self, edit_id: int, actor: str, source: str = "cli", reason: str = "") -> Edit:
        """Drop an owed KB change: write a 'dismiss' row for it (the attempt keeps its status); returns that row."""
        if source not in SOURCES:
            raise BadInput(f"unknown edit source {source!r}; known: {', '.join(SOURCES)}")
        orig = self.get(edit_id)
        owed = [o for o in self.owed(orig.subject_id, orig.property) if edit_id in o.run] if orig.subject_id else []
        if not owed:
            if orig.source == "daemon" and orig.status in OWING:
                why = f"its {orig.status} attempt was settled since (applied, answered or dismissed)"
            else:
                why = f"it is a {orig.status} edit from the {orig.source}, not a daemon attempt that failed"
            raise BadInput(f"edit {edit_id} is not an owed KB change: {why}; see kbsync history --owed")
        newest = owed[0].edit
        row = Edit(actor=actor, source=source, subject_id=newest.subject_id, subject_label=newest.subject_label,
                   property=newest.property, object_id=newest.object_id, object_label=newest.object_label,
                   question=newest.question, claim=newest.claim, method="dismiss", status="dismiss",
                   reasons=[reason] if reason else [], kb_revision=newest.kb_revision, reverts_edit_id=edit_id)
        return self.record(row)

    def mark_reverted(self, edit_id: int, actor: str, source: str = "cli", reason: str = "", **fields: Any) -> Edit:
        """Write a 'revert' row for an applied edit (or an active consolidation) and mark it 'reverted'; returns the revert row."""
        for k in fields:
            if k not in Edit.model_fields or k in ("id", "status", "reverts_edit_id"):
                raise TypeError(f"mark_reverted() got unknown or fixed field {k!r}")
        with self._session() as s:
            revert = self._revert(s, self._get(s, edit_id), actor, source, reason, **fields)
            s.commit()
            return revert

    @staticmethod
    def _revert(s: Session, orig: Edit, actor: str, source: str, reason: str, **fields: Any) -> Edit:
        """Add the 'revert' row of orig and flip orig to 'reverted' in session s (the caller commits)."""
        if source not in SOURCES:
            raise BadInput(f"unknown edit source {source!r}; known: {', '.join(SOURCES)}")
        if orig.status not in STACKED:
            raise BadInput(f"edit {orig.id} is {orig.status}; only applied edits can be reverted")
        revert = Edit(
            actor=actor,
            source=source,
            subject_id=orig.subject_id,
            subject_label=orig.subject_label,
            property=orig.property,
            object_id=orig.object_id,
            object_label=orig.object_label,
            question=orig.question,
            claim=orig.claim,
            # The revert takes the model from the edit's answer back to the earlier one.
            before_answer=orig.after_answer,
            after_answer=orig.before_answer,
            method="revert",
            status="revert",
            reasons=[reason] if reason else [],
            delta_path=orig.delta_path,
            delta_sha256=orig.delta_sha256,
            kb_revision=orig.kb_revision,
            reverts_edit_id=orig.id,
        )
        for k, v in fields.items():
            setattr(revert, k, v)
        s.add(revert)
        s.flush()
        orig.status = "reverted"
        orig.reverted_by = revert.id
        s.add(orig)
        return revert
