"""`kbsync consolidate`: the served model's applied edits written again, from the base weights, as one delta."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from kbsync.commands.audit import check_edit_id
from kbsync.commands.common import ConfigOpt, DataDirOpt, DbOpt, JsonOpt, ModelOpt, console, esc, quiet_transformers, settings_from
from kbsync.commands.edit import EXIT_REJECTED


def consolidate(
    without: Annotated[Optional[list[int]], typer.Option("--without", help="An applied edit to leave out, reverted with the consolidation (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and judge it; write nothing.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "",
    actor: Annotated[Optional[str], typer.Option("--actor", help="Who is consolidating (default $USER).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the stack of applied edits by one delta made on the base model, checked like an edit (exit 4 if rejected).

    Every fact the stacked edits answered must still be answered and the knowledge base's other
    facts must stay within the regression limits; the individual edits stay applied and listed.
    While a daemon runs over the data directory the consolidation runs in it.
    """
    quiet_transformers()
    from kbsync.daemon_client import consolidate_via_daemon

    ids = [check_edit_id(i) for i in without or []]
    settings = settings_from(config, model, data_dir, db)
    data = consolidate_via_daemon(settings, ids, dry_run=dry_run, actor=actor or "", reason=reason)
    via = "daemon"
    if data is None:
        from kbsync.audit import AuditLog
        from kbsync.pipeline import EditPipeline

        pipeline = EditPipeline(settings, audit=AuditLog.open(settings.store.db_url))
        try:
            out = pipeline.consolidate(tuple(ids), actor=actor or "", reason=reason, dry_run=dry_run)
        finally:
            pipeline.close()
        for line in pipeline.repairs:
            print(f"kbsync: repaired: {line}", file=sys.stderr)
        data, via = out.to_dict(), "store"
    if as_json:
        print(json.dumps({**data, "via": via}, indent=2, default=str))
    else:
        _show(data)
    if data["status"] == "rejected":
        raise typer.Exit(EXIT_REJECTED)


def _show(data: dict[str, Any]) -> None:
    """One summary line, then the reasons or the facts it lost."""
    m = data["metrics"]
    n = len(data["consolidates"])
    what = "would be served" if data["dry_run"] else "now served"
    facts = f"{m['held_after']}/{m['facts']} facts answered (the stack: {m['held_before']})"
    retain = f"retain mean KL {m['mean_kl']:.3g}, unchanged {m['unchanged']:.1%}"
    head = f"consolidation {data['id']}" if data["id"] else "consolidation"
    if data["status"] == "rejected":
        console.print(esc(f"{head} rejected: {n} edit(s); {facts}; {retain}"))
        for r in data["reasons"]:
            console.print(esc(f"  - {r}"))
        return
    line = f"{head}: {n} applied edit(s) {what} as one delta ({m['delta_bytes']:,} bytes); {facts}; {retain}"
    if data["without"]:
        line += f"; without edit(s) {', '.join(map(str, data['without']))} (reverted)"
    if m.get("repaired"):
        line += f"; {len(m['repaired'])} fact(s) edited again on it"
    console.print(esc(line + f"; {m['seconds']:.1f} s"))


def register(app: typer.Typer) -> None:
    """Add consolidate."""
    app.command("consolidate")(consolidate)
