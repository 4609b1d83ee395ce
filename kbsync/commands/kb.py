"""`kbsync kb ...`: run the embedded local KB and read or edit its facts."""

from __future__ import annotations

from pathlib import Path

import typer

from kbsync.commands.common import ConfigOpt, DataDirOpt, settings_from
from kbsync.errors import KbsyncError
from kbsync.facts import get_relation, parse_phrase
from kbsync.kb.local import LocalKB

kb_app = typer.Typer(help="The embedded local knowledge base (an oxigraph server on 127.0.0.1).",
                     no_args_is_help=True)


def kb_dir(config: str | None = None, data_dir: str | None = None) -> Path:
    """Where the local KB keeps its store, snapshot and state file (as the daemon does: <data_dir>/kb)."""
    return settings_from(config, data_dir=data_dir).store.data_path / "kb"


def running_kb(config: str | None = None, data_dir: str | None = None) -> LocalKB:
    """The running local KB, or a one-line error saying how to start it."""
    kb = LocalKB.find_running(kb_dir(config, data_dir))
    if kb is None:
        raise KbsyncError("the local KB is not running; start it with `kbsync kb start`")
    return kb


def _describe(pid: str, subject: str) -> str:
    return f"{get_relation(pid).label} of {subject}"


@kb_app.command("start")
def start(port: int = typer.Option(0, help="Port on 127.0.0.1 (0: pick a free one)."),
          config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Start the local KB in the background and print its SPARQL endpoint."""
    where = kb_dir(config, data_dir)
    running = LocalKB.find_running(where)
    if running is not None:
        typer.echo(f"already running: {running.endpoint} (pid {running.pid})")
        return
    kb = LocalKB(where, port=port or None).start(detach=True)
    typer.echo(kb.endpoint)


@kb_app.command("stop")
def stop(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Stop the local KB if it is running."""
    kb = LocalKB.find_running(kb_dir(config, data_dir))
    if kb is None:
        typer.echo("not running")
        return
    pid = kb.pid
    kb.stop()
    typer.echo(f"stopped (pid {pid})")


@kb_app.command("status")
def status(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Say whether the local KB runs, where; exit 1 when it does not."""
    kb = LocalKB.find_running(kb_dir(config, data_dir))
    if kb is None:
        typer.echo("not running")
        raise typer.Exit(1)
    typer.echo(f"running: {kb.endpoint} (pid {kb.pid}, store {kb.location})")


@kb_app.command("get")
def get(phrase: str = typer.Argument(..., help='The fact, e.g. "capital of Namibia".'),
        config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print the local KB's current value(s) of a fact, with the subject's revision."""
    pid, subject = parse_phrase(phrase)
    facts = running_kb(config, data_dir).get_facts(pid, subject)
    values = ", ".join(f.object.label for f in facts)
    typer.echo(f"{_describe(pid, facts[0].subject.label)}: {values} (revision {facts[0].revision})")


@kb_app.command("set")
def set_(phrase: str = typer.Argument(..., help='The fact, e.g. "capital of Namibia".'),
         value: str = typer.Argument(..., help="The new value's English label, e.g. Windhoek."),
         config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Edit a fact in the running local KB as a Wikidata editor would (bumps the revision)."""
    pid, subject = parse_phrase(phrase)
    change = running_kb(config, data_dir).set_fact(pid, subject, value)
    what = _describe(pid, change.new.subject.label)
    old = ", ".join(e.label for e in change.old) or "(none)"
    if change.changed:
        typer.echo(f"{what}: {old} -> {change.new.object.label} (revision {change.new.revision})")
    else:
        typer.echo(f"{what}: already {change.new.object.label} (revision {change.new.revision})")


def register(app: typer.Typer) -> None:
    """Add the `kb` sub-command group to the kbsync app."""
    app.add_typer(kb_app, name="kb")
