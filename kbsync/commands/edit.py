"""`kbsync edit "capital of Namibia" Windhoek`: write a fact into the served model, checked and audited."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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
    subject: Annotated[Optional[str], typer.Option("--subject", help="Raw form: the entity the prompt names (it must occur in it); the default gated method fires on it.")] = None,
    batch_file: Annotated[Optional[Path], typer.Option("--batch", help='Edit every fact of a JSON-lines file ({"phrase": ..., "target": ...} or {"prompt": ..., "subject": ..., "target": ...} per line), each checked and audited, the rows linked by one batch id; the whole file is checked first.')] = None,
    singles: Annotated[bool, typer.Option("--singles", help="(--batch) Edit the facts one after another, each checked on the model the previous one left, instead of as one update.")] = False,
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
    if batch_file is not None:
        if phrase is not None or target is not None or prompt is not None or raw_target is not None:
            raise BadInput("give either --batch FILE or one edit (PHRASE TARGET or --prompt/--target), not both")
        from kbsync.batch import read_batch

        items = read_batch(batch_file)
        _edit_batch(settings, items, method=method, force=force, dry_run=dry_run, actor=actor or "", as_json=as_json,
                    singles=singles)
        return
    if prompt is not None or raw_target is not None:
        if phrase is not None or target is not None:
            raise BadInput("give either PHRASE TARGET or --prompt/--target, not both")
        if not (prompt or "").strip():
            raise BadInput("empty --prompt: give the text the model should complete")
        if not (raw_target or "").strip():
            raise BadInput("empty target: say what the new answer is")
        if subject is not None and (not subject.strip() or subject.strip() not in prompt):
            raise BadInput(f"--subject {subject!r} does not occur in the prompt {prompt!r}")
        what: Any = prompt
    else:
        if subject is not None:
            raise BadInput("--subject goes with --prompt (a fact phrase names its subject itself)")
        if phrase is None or target is None:
            raise BadInput('usage: kbsync edit "capital of Namibia" Windhoek (or --prompt TEXT --target ANSWER)')
        what = fact_from_phrase(phrase, target)
    # A running daemon already holds the served model: edit that one, not a second copy.
    from kbsync.daemon_client import edit_via_daemon

    served = edit_via_daemon(settings, what, raw_target, method=method, options=dict(settings.editor.options),
                             force=force, dry_run=dry_run, actor=actor or "", subject=subject or "")
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
        out = pipeline.edit_fact(what, raw_target, method=method, force=force, dry_run=dry_run, actor=actor or "",
                                 subject=subject or "")
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


def _row(item: Any, out: Any, dry_run: bool) -> dict[str, Any]:
    """One fact's result from its EditOutcome."""
    return {"line": item.line, "status": out.status, "edit_id": None if dry_run else out.edit.id,
            "method": out.edit.method, "reasons": list(out.edit.reasons)}


def _batch_line(item: Any, row: dict[str, Any], results: list[dict[str, Any]], as_json: bool) -> None:
    """Keep one fact's result and print its line (unless --json)."""
    row["fact"] = item.label
    results.append(row)
    if not as_json:
        ident = f"edit {row['edit_id']}" if row["edit_id"] is not None else "not recorded (dry run)"
        colour = {"applied": "green", "rejected": "red"}.get(row["status"], "yellow")
        console.print(f"line {item.line}: {esc(item.label)}: [{colour}]{esc(str(row['status']))}[/] "
                      f"({esc(ident)}, {esc(str(row['method']))})"
                      + ("" if row["status"] == "applied" else f" {esc('; '.join(row['reasons']))}"))


def _edit_batch(settings: Any, items: list[Any], *, method: str | None, force: bool, dry_run: bool, actor: str,
                as_json: bool, singles: bool = False) -> None:
    """A batch through the running daemon (one fact at a time), else here as one update (kbsync.batch_edit) or,
    with singles, one fact at a time; a line each."""
    from kbsync.batch import new_batch_id
    from kbsync.daemon_client import edit_via_daemon, running_daemon

    batch = new_batch_id()
    results: list[dict[str, Any]] = []
    pipeline = None
    if running_daemon(settings) is None:
        from kbsync.audit import AuditLog
        from kbsync.pipeline import EditPipeline

        pipeline = EditPipeline(settings, audit=AuditLog.open(settings.store.db_url))
    joint: list[int] = []
    try:
        if pipeline is not None and not singles:
            # Here, one update: every fact proposed on the same model and judged together (kbsync.batch_edit).
            from kbsync.batch_edit import edit_batch

            done = edit_batch(pipeline, items, method=method, force=force, dry_run=dry_run, actor=actor, batch=batch)
            joint = [items[i].line for i in done.joint]
            for item, out in zip(items, done.outcomes):
                _batch_line(item, _row(item, out, dry_run), results, as_json)
        # One fact at a time: through the daemon (its API edits one fact per request), or here with --singles.
        for item in items if pipeline is None or singles else []:
            try:
                if pipeline is not None:
                    row = _row(item, pipeline.edit_fact(item.what, item.target, method=method, force=force,
                                                        dry_run=dry_run, actor=actor, batch=batch,
                                                        subject=item.subject), dry_run)
                else:
                    out = edit_via_daemon(settings, item.what, item.target, method=method,
                                          options=dict(settings.editor.options), force=force, dry_run=dry_run,
                                          actor=actor, batch=batch, subject=item.subject)
                    if out is None:
                        raise BadInput("the daemon stopped during the batch; the rest was not edited")
                    row = {"line": item.line, "status": out.get("status"), "edit_id": out.get("edit_id"),
                           "method": out.get("method"), "reasons": out.get("reasons") or [], "via": "daemon"}
            except Exception:
                # The facts before this one are each applied (or not) and audited on their own: say so, then fail.
                print(f"kbsync: batch {batch} stopped at line {item.line} ({item.label}); "
                      f"{len(results)} of {len(items)} edits done before it", file=sys.stderr)
                raise
            _batch_line(item, row, results, as_json)
    finally:
        if pipeline is not None:
            pipeline.close()
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    if as_json:
        print(json.dumps({"batch": batch, "dry_run": dry_run, "counts": counts, "joint": joint, "edits": results},
                         indent=2))
    else:
        console.print(f"batch {batch}{' (dry run)' if dry_run else ''}: "
                      + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                      + (f"; lines {', '.join(map(str, joint))} judged as one update" if joint else ""))
    if counts.get("rejected"):
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
