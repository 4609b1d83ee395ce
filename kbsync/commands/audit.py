"""`kbsync history`, `kbsync show ID`, `kbsync revert ID`: read and act on the audit log."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from kbsync.commands.common import ConfigOpt, DataDirOpt, DbOpt, JsonOpt, console, esc, settings_from
from kbsync.errors import BadInput

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
# Edit ids are INTEGER columns: 32-bit on PostgreSQL. A larger id names no edit and would
# overflow the driver instead of saying so.
MAX_ID = 2**31 - 1
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> datetime:
    """An ISO date/time (UTC unless it says otherwise) or a relative age such as 30m, 2h, 7d."""
    m = _RELATIVE.match(text.strip().lower())
    if m:
        try:
            return datetime.now(timezone.utc) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise BadInput(f"--since {text!r} reaches back before the year 1") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(f"--since {text!r}: use an ISO date/time (2026-01-31, 2026-01-31T12:00) or an age (30m, 2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def check_edit_id(edit_id: int) -> int:
    """The id, or a one-line BadInput when no edit can have it (ids start at 1)."""
    if not 1 <= edit_id <= MAX_ID:
        raise BadInput(f"edit id {edit_id} is out of range: ids run from 1 to {MAX_ID}")
    return edit_id


def _read_audit(config: str | None, data_dir: str | None, db: str | None) -> Any:
    from kbsync.audit import AuditLog

    # Reading must work on a read-only data directory (a backup, another user's): write nothing.
    return AuditLog.open(settings_from(config, None, data_dir, db).store.db_url, read_only=True)


# kbsync history's columns: all of them from this terminal width (or --wide), else the narrow set.
WIDE_COLUMNS = 140
HISTORY_WIDE = ("id", "when (UTC)", "status", "subject", "prop", "target", "before -> after", "method", "actor", "seq")
HISTORY_NARROW = ("id", "when (UTC)", "status", "fact", "target", "answer now", "method")


def history(
    status: Annotated[Optional[str], typer.Option("--status", help="Only this status (applied, rejected, noop, reverted, revert, failed, pending, dismiss, consolidation, superseded).")] = None,
    owed_only: Annotated[bool, typer.Option("--owed", help="Only KB changes still owed: the model does not answer them yet.")] = False,
    subject: Annotated[Optional[str], typer.Option("--subject", help="Only this subject (label, any case, or id).")] = None,
    prop: Annotated[Optional[str], typer.Option("--property", help="Only this property id (e.g. P36).")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="Only edits since an ISO time or an age (2h, 7d).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many rows (0 for all).")] = 50,
    batch: Annotated[Optional[str], typer.Option("--batch", help="Only the rows of one batch (kbsync edit --batch, or one daemon poll's changes).")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column in full (answers, actor, sequence), however wide.")] = False,
) -> None:
    """List edits, newest first; KB changes the model does not answer yet are marked owed, with the reason."""
    from kbsync.daemon import owed_retry_at

    when = parse_since(since) if since else None
    if batch is not None:
        from kbsync.batch import check_batch_id

        if not check_batch_id(batch):
            raise BadInput("--batch needs a batch id (kbsync edit --batch prints it)")
    if limit < 0:
        raise BadInput("--limit must be 0 (all) or more")
    settings = settings_from(config, None, data_dir, db)
    # No log holds more rows than ids; a larger limit (which SQLite cannot bind) means all.
    most = limit if 0 < limit <= MAX_ID else None
    with _read_audit(config, data_dir, db) as audit:
        owed = {o.edit.id: o for o in audit.owed()}
        rows = audit.history(status=status, subject=subject, property=prop, since=when,
                             limit=None if owed_only else most, batch=batch)
    if owed_only:
        rows = [e for e in rows if e.id in owed][:most]

    def owed_info(e: Any) -> dict[str, Any]:
        o = owed.get(e.id)
        if o is None:
            return {"owed": False}
        return {"owed": True, "attempts": o.attempts, "next_retry": owed_retry_at(o, settings).isoformat(timespec="seconds")}

    if as_json:
        print(json.dumps([{**e.as_json(), **owed_info(e)} for e in rows], indent=2, default=str))
        return
    # One line per edit: a terminal narrower than every column gets the ones a reviewer scans (the
    # fact, its target and the answer now), long cells end in an ellipsis; --wide or --json has all.
    wide = wide or console.width >= WIDE_COLUMNS
    from rich import box

    table = Table(title=f"{len(rows)} edit(s), newest first", **({} if wide else {"box": box.SIMPLE_HEAD}))
    names = HISTORY_WIDE if wide else HISTORY_NARROW
    # Narrow: no vertical rules; the id, time and status whole; the three free-text cells share what
    # is left equally (2 columns of padding each, 29 for id, time, status and method).
    free = max(8, (console.width - 46) // 3)
    for col in names:
        if wide:
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, no_wrap=True, overflow="ellipsis",
                             min_width={"id": len(str(max((e.id for e in rows), default=1))), "when (UTC)": 11,
                                        "status": 7}.get(col),
                             max_width={"fact": free, "target": free, "answer now": free, "method": 9}.get(col))
    colour = {"applied": "green", "rejected": "red", "failed": "red", "reverted": "yellow", "revert": "yellow",
              "consolidation": "cyan"}
    for e in rows:
        st = f"[{colour[e.status]}]{esc(e.status)}" if e.status in colour else esc(e.status)
        if e.reverts_edit_id:
            st += f" of {e.reverts_edit_id}"
        if e.forced:
            st += " (forced)"
        if e.id in owed:
            st += ", owed"
        cells = {"id": str(e.id), "when (UTC)": f"{e.created_at:%Y-%m-%d %H:%M:%S}" if wide else f"{e.created_at:%m-%d %H:%M}",
                 "status": st, "subject": esc(e.subject_label or e.question), "prop": esc(e.property),
                 "fact": esc(f"{e.subject_label or e.question} {e.property}".strip()), "target": esc(e.object_label),
                 "before -> after": esc(f"{e.before_answer} -> {e.after_answer}"), "answer now": esc(e.after_answer or ""),
                 "method": esc(e.method), "actor": esc(e.actor), "seq": "" if e.sequence is None else str(e.sequence)}
        table.add_row(*(cells[c] for c in names))
    if wide:  # every cell whole: as wide as the table needs, past the terminal's edge
        from rich.measure import Measurement

        need = Measurement.get(console, console.options.update(width=100_000), table).maximum
        saved, console.width = console.width, max(console.width, need)  # print() caps width at the console's
        try:
            console.print(table)
        finally:
            console.width = saved
    else:
        console.print(table)
    # Below the table, not in a column: a reason is a sentence and the table is already wide.
    for e in rows:
        if e.id in owed:
            info = owed_info(e)
            why = "; ".join(e.reasons) or "no reason recorded"
            console.print(esc(f"owed: edit {e.id} ({e.subject_label} {e.property} -> {e.object_label}): {e.status} "
                              f"{info['attempts']} time(s) in a row, next retry from {info['next_retry']}: {why}"))


def show(
    edit_id: Annotated[int, typer.Argument(help="The edit's id (see kbsync history).")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one edit in full, with its paraphrase and retain checks."""
    check_edit_id(edit_id)
    with _read_audit(config, data_dir, db) as audit:
        e = audit.get(edit_id)
        checks = audit.checks(edit_id)
    if as_json:
        print(json.dumps({**e.as_json(), "checks": [c.model_dump() for c in checks]}, indent=2, default=str))
        return
    fields = e.as_json()
    table = Table(title=f"edit {e.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in fields.items():
        if v in (None, "", [], {}):
            continue
        table.add_row(k, esc(json.dumps(v) if isinstance(v, (dict, list)) else v))
    console.print(table)
    para = [c for c in checks if c.kind == "paraphrase"]
    if para:
        t = Table(title="paraphrases")
        for col in ("prompt", "before", "after", "ok"):
            t.add_column(col)
        for c in para:
            t.add_row(esc(c.prompt), esc(c.before), esc(c.after), "[green]yes" if c.ok else "[red]no")
        console.print(t)
    retain = [c for c in checks if c.kind == "retain"]
    if retain:
        changed = sorted((c for c in retain if not c.ok), key=lambda c: -(c.kl or 0))
        console.print(f"retain: {len(retain) - len(changed)}/{len(retain)} answers unchanged")
        for c in changed[:10]:
            console.print(esc(f"  changed: {c.prompt} {c.before!r} -> {c.after!r} (KL {c.kl or 0:.3g})"))


def revert(
    edit_id: Annotated[int, typer.Argument(help="The applied edit to undo.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "",
    actor: Annotated[Optional[str], typer.Option("--actor", help="Who is reverting (default $USER).")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take an applied edit's delta out of the served model; the revert is recorded.

    While a daemon runs over the data directory the revert goes through it, so its served
    model has dropped the edit before this command returns.
    """
    from kbsync.daemon_client import revert_via_daemon
    from kbsync.pipeline import EditPipeline

    check_edit_id(edit_id)
    settings = settings_from(config, None, data_dir, db)
    remote = revert_via_daemon(settings, edit_id, actor=actor or "", reason=reason)
    if remote is not None:
        data, row_id, where = remote, remote["id"], "the running daemon's served model"
    else:
        pipeline = EditPipeline(settings)
        try:
            row = pipeline.revert(edit_id, actor=actor or "", reason=reason)
        finally:
            pipeline.close()
        data, row_id, where = row.as_json(), row.id, "the served model"
    if as_json:
        print(json.dumps({**data, "via": "daemon" if remote is not None else "store"}, indent=2, default=str))
    else:
        console.print(f"edit {edit_id} reverted (recorded as edit {row_id}); {where} no longer includes it")


def dismiss(
    edit_id: Annotated[int, typer.Argument(help="An owed KB change: its failed or rejected attempt (kbsync history --owed).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "",
    actor: Annotated[Optional[str], typer.Option("--actor", help="Who is dismissing (default $USER).")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop an owed KB change: the daemon stops retrying it; recorded as a 'dismiss' row."""
    from kbsync.audit import AuditLog
    from kbsync.pipeline import default_actor
    from kbsync.store import DeltaStore

    check_edit_id(edit_id)
    settings = settings_from(config, None, data_dir, db)
    store = DeltaStore.for_settings(settings)
    # Under the store lock: a retry of this change in flight lands first, and is dismissed with it.
    with AuditLog.open(settings.store.db_url) as audit, store.lock():
        row = audit.mark_dismissed(edit_id, actor or default_actor(), "cli", reason)
    if as_json:
        print(json.dumps(row.as_json(), indent=2, default=str))
    else:
        console.print(esc(f"edit {edit_id} dismissed (recorded as edit {row.id}): the daemon no longer retries "
                          f"{row.subject_label} {row.property} -> {row.object_label}"))


def register(app: typer.Typer) -> None:
    """Add history, show, revert and dismiss."""
    app.command("history")(history)
    app.command("show")(show)
    app.command("revert")(revert)
    app.command("dismiss")(dismiss)
