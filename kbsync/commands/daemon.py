"""`kbsync daemon start|status|stop`: the sync daemon that polls the KB, edits and serves the model."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from kbsync.commands.common import ConfigOpt, DataDirOpt, DbOpt, JsonOpt, ModelOpt, console, esc, quiet_transformers, settings_from

daemon_app = typer.Typer(help="The sync daemon: polls the KB, edits changed facts in, serves the model over HTTP.",
                         no_args_is_help=True)


def _argv(config: str | None, model: str | None, data_dir: str | None, db: str | None) -> list[str]:
    out: list[str] = []
    for flag, value in (("--config", config), ("--model", model), ("--data-dir", data_dir), ("--db", db)):
        if value:
            out += [flag, value]
    return out


@daemon_app.command("start")
def start(
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this process (containers); log to stderr.")] = False,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Start the daemon (in the background unless --foreground) and print its API URL."""
    from kbsync.daemon import Daemon, DaemonPaths, setup_logging, start_background

    settings = settings_from(config, model, data_dir, db)
    if foreground:
        quiet_transformers()
        setup_logging()
        Daemon(settings).run()
        return
    state = start_background(settings, _argv(config, model, data_dir, db))
    typer.echo(f"kbsync daemon running: {state['url']} (pid {state['pid']}, log {DaemonPaths.of(settings).log})")


@daemon_app.command("stop")
def stop(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Stop the daemon gracefully (it finishes the edit in flight)."""
    from kbsync.daemon import stop_daemon

    pid = stop_daemon(settings_from(config, data_dir=data_dir))
    typer.echo("not running" if pid is None else f"stopped (pid {pid})")


@daemon_app.command("status")
def status(config: ConfigOpt = None, data_dir: DataDirOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Running or not, last poll, cursor, and the daemon's edit counts by status; exit 1 when not running."""
    from kbsync.daemon import health, read_state, running_pid

    settings = settings_from(config, data_dir=data_dir, db=db)
    pid = running_pid(settings)
    state = read_state(settings)
    live = health(state["url"]) if pid is not None and state.get("url") else None
    info = {**state, **(live or {}), "running": live is not None, "pid": pid,
            "cursor": _cursor_info(settings, state.get("cursor") or f"{settings.kb.mode}@{settings.kb.endpoint}"),
            "counts": _counts(settings)}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        table = Table(title="kbsync daemon", show_header=False)
        table.add_row("running", f"[green]yes (pid {pid})" if live else "[red]no")
        for key in ("url", "endpoint", "last_poll", "last_ok", "polls", "failures", "last_error", "in_flight",
                    "next_consolidation"):
            if info.get(key) not in (None, ""):
                table.add_row(key.replace("_", " "), esc(info[key]))
        cur = info["cursor"]
        table.add_row("cursor", "none yet" if not cur else
                      esc(f"{cur['name']}: {cur['slots']} slots, {cur['entities']} entities, updated {cur['updated_at']}"))
        table.add_row("daemon edits", ", ".join(f"{k} {v}" for k, v in info["counts"].items()) or "none")
        if info["counts"]["owed"]:
            table.add_row("owed", f"[red]{info['counts']['owed']} KB change(s) the model does not answer yet[/] "
                          "(kbsync history --owed; kbsync dismiss ID)"
                          + (esc(f"; next retry from {info['next_retry']}") if info.get("next_retry") else ""))
        console.print(table)
    if live is None:
        raise typer.Exit(1)


def _cursor_info(settings, name: str) -> dict | None:
    from kbsync.audit import AuditLog
    from kbsync.cursor_store import CursorStore

    with AuditLog.open(settings.store.db_url) as audit:
        return CursorStore(audit).info(name)


def _counts(settings) -> dict[str, int]:
    """Edits with source=daemon by status (pending, applied, rejected, ...), and the KB changes still owed."""
    import sqlalchemy as sa

    from kbsync.audit import AuditLog, Edit

    with AuditLog.open(settings.store.db_url) as audit:
        with audit.engine.connect() as c:
            rows = c.execute(sa.select(Edit.status, sa.func.count()).where(Edit.source == "daemon").group_by(Edit.status))
            counts = {status: n for status, n in rows}
        owed = len(audit.owed())
    return {**{k: counts.get(k, 0) for k in ("pending", "applied", "rejected", "noop", "failed", "reverted",
                                             "consolidation")},
            "owed": owed}


def register(app: typer.Typer) -> None:
    """Add the `daemon` sub-command group."""
    app.add_typer(daemon_app, name="daemon")
