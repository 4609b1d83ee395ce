"""`kbsync edit "capital of Namibia" Windhoek`: write a fact into the served model, checked and audited."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from kbsync.commands.common import (ConfigOpt, DataDirOpt, DbOpt, JsonOpt, ModelOpt, console, esc, quiet_transformers,
                                    settings_from)
from kbsync.errors import BadInput

# Exit status when the regression check rejects the edit (distinct from errors, 1-3).
EXIT_REJECTED = 4


def parse_option(text: str) -> tuple[str, Any]:
    """"lr=1e-3" -> ("lr", 0.001): JSON values (numbers, true/false), else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--option {text!r} must look like KEY=VALUE (e.g. lr=1e-3)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def edit(
    phrase: Annotated[Optional[str], typer.Argument(help='The fact, e.g. "capital of Namibia".')] = None,
    target: Annotated[Optional[str], typer.Argument(help="The new answer, e.g. Windhoek.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help='Raw form: the text to complete, e.g. "The capital of Namibia is".')] = None,
    raw_target: Annotated[Optional[str], typer.Option("--target", help="Raw form: the new completion.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Edit method (ke, ke-loop, ft-layer (alias ft), ft-all, zhu); default from settings.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Method option KEY=VALUE (e.g. lr=1e-3), repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Commit even if the regression check fails (recorded).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Do everything but commit; nothing is written.")] = False,
    actor: Annotated[Optional[str], typer.Option("--actor", help="Who is editing (default $USER).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Edit the served model so it answers the fact; reject (exit 4) if the regression check fails."""
    quiet_transformers()
    from kbsync.audit import AuditLog
    from kbsync.corpus import fact_from_phrase

    settings = settings_from(config, model, data_dir, db)
    for text in option or []:
        key, value = parse_option(text)
        settings.editor.options[key] = value
    # Resolve the input completely before opening anything, so bad input writes nothing.
    if prompt is not None or raw_target is not None:
        if phrase is not None or target is not None:
            raise BadInput("give either PHRASE TARGET or --prompt/--target, not both")
        if not (prompt or "").strip():
            raise BadInput("empty --prompt: give the text the model should complete")
        if not (raw_target or "").strip():
            raise BadInput("empty target: say what the new answer is")
        what: Any = prompt
    else:
        if phrase is None or target is None:
            raise BadInput('usage: kbsync edit "capital of Namibia" Windhoek (or --prompt TEXT --target ANSWER)')
        what = fact_from_phrase(phrase, target)
    # A running daemon already holds the served model: edit that one, not a second copy.
    from kbsync.daemon_client import edit_via_daemon

    served = edit_via_daemon(settings, what, raw_target, method=method, options=dict(settings.editor.options),
                             force=force, dry_run=dry_run, actor=actor or "")
    if served is not None:
        _show_daemon(served, as_json)
        if served.get("status") == "rejected":
            raise typer.Exit(EXIT_REJECTED)
        return
    # The audit log answers (or not) before torch and the model are loaded.
    audit = AuditLog.open(settings.store.db_url)
    from kbsync.pipeline import EditPipeline

    pipeline = EditPipeline(settings, audit=audit)
    try:
        out = pipeline.edit_fact(what, raw_target, method=method, force=force, dry_run=dry_run, actor=actor or "")
    finally:
        pipeline.close()
    for line in out.repairs:
        print(f"kbsync: repaired: {line}", file=sys.stderr)
    for line in out.synced:  # another process's edit or revert since this one started: not a repair
        print(f"kbsync: another process changed the store meanwhile ({line}); this edit was made on top of it",
              file=sys.stderr)
    if as_json:
        print(json.dumps(out.to_dict(), indent=2, default=str))
    else:
        _show(out)
    if out.status == "rejected":
        raise typer.Exit(EXIT_REJECTED)


def _show(out: Any) -> None:
    e = out.edit
    what = f"{e.subject_label} · {e.property}" if e.property else repr(e.question)
    if e.status == "noop":
        console.print(f"{esc(what)}: the model already answers [green]{esc(e.before_answer)}[/]; nothing to edit"
                      + ("" if out.dry_run else f" (recorded noop as edit {e.id})"))
        return
    _show_earlier(out.earlier_attempts())
    table = Table(title=esc(f"{what} -> {e.object_label} ({e.method})"))
    for col in ("kind", "prompt", "before", "after", "ok"):
        table.add_column(col)
    for b, a in zip(out.before, out.after):
        table.add_row(a.kind, esc(a.prompt), esc(b.prediction), esc(a.prediction), "[green]yes" if a.ok else "[red]no")
    console.print(table)
    m = e.metrics
    para = m.get("paraphrase_accuracy")
    console.print(
        f"retain ({m['retain_size']} facts): mean KL {m['mean_kl']:.4g} (max {e.thresholds['max_mean_kl']:g}), "
        f"max KL {m['max_kl']:.4g} (max {e.thresholds['max_kl']:g}), unchanged {m['unchanged']:.1%} "
        f"(min {e.thresholds['min_unchanged']:.0%}, tokens chosen by a margin >= {e.thresholds.get('tie_margin', 0):g})"
        + ("" if para is None else f"; paraphrases {para:.0%} (min {e.thresholds['min_paraphrase_accuracy']:.0%})")
    )
    if m.get("delta_scale", 1.0) < 1.0:
        console.print(f"delta: the method's proposal scaled by {m['delta_scale']:.3g}, the smallest factor at which "
                      f"the question and the paraphrases it flipped still hold (editor.shrink)")
    if m.get("fires_on"):
        console.print(esc(f"scope: gated, fires only where the input has {', '.join(map(repr, m['fires_on']))}"))
    for c in out.retain.changed()[:5] if out.retain else []:
        console.print(esc(f"  changed: {c.item.prompt} {c.before!r} -> {c.after!r} (KL {c.kl:.3g})"))
    for r in e.reasons:
        console.print(f"  [yellow]{esc(r)}")
    verdict = {"applied": "[green]applied", "rejected": "[red]rejected"}[e.status]
    if out.dry_run:
        console.print(f"dry run: would be {verdict}[/]; nothing written")
    else:
        console.print(f"edit {e.id} {verdict}[/]" + (f" (delta {esc(e.delta_path)}, sequence {e.sequence})" if e.status == "applied" else ""))


def _show_earlier(attempts: list[dict[str, Any]]) -> None:
    """One line per method of the fallback list that was tried first and rejected."""
    for earlier in attempts:
        label = f"edit {earlier['id']}" if earlier.get("id") is not None else "not recorded (dry run)"
        console.print(esc(f"{earlier['method']}: rejected ({label}): {'; '.join(earlier['reasons'])}"))


def _show_daemon(out: dict[str, Any], as_json: bool) -> None:
    """The daemon's answer to an edit request (the audit log has the full record: kbsync show ID)."""
    if as_json:
        print(json.dumps({**out, "via": "daemon"}, indent=2))
        return
    _show_earlier(out.get("earlier_attempts") or [])
    console.print(esc(f"via the running daemon: edit {out.get('edit_id')} {out.get('status')} "
                      f"({out.get('method')}): {out.get('before')!r} -> {out.get('after')!r}"))
    for r in out.get("reasons") or []:
        console.print(f"  [yellow]{esc(r)}")


def register(app: typer.Typer) -> None:
    """Add the edit command."""
    app.command("edit")(edit)
