"""`kbsync check PHRASE`: what does the served model answer about a fact?"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from kbsync.commands.common import (ConfigOpt, DataDirOpt, DbOpt, JsonOpt, ModelOpt, console, esc, quiet_transformers,
                                    settings_from)


def check(
    phrase: Annotated[str, typer.Argument(help='The fact, e.g. "capital of Namibia".')],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the served model the fact's question and paraphrases; show prediction vs expected."""
    quiet_transformers()
    from kbsync.check import probes, run_probes
    from kbsync.corpus import resolve
    from kbsync.daemon_client import RemoteModel, running_daemon
    from kbsync.facts import parse_phrase, render
    from kbsync.pipeline import EditPipeline

    settings = settings_from(config, model, data_dir, db)
    pid, subject = parse_phrase(phrase)
    fact = resolve(pid, subject)
    prompts = render(fact)
    # A running daemon already serves the model (base + applied edits): ask it rather than
    # loading a second copy, unless --model names another model.
    adapter = RemoteModel(client) if model is None and (client := running_daemon(settings)) else None
    if adapter is None:
        # The served model: base weights plus every applied edit, checksums verified.
        pipeline = EditPipeline(settings)
        try:
            adapter = pipeline.adapter
        finally:
            pipeline.close()
        for line in pipeline.repairs:
            print(f"kbsync: repaired: {line}", file=sys.stderr)
    else:
        print(f"kbsync: asked the running daemon ({client.url})", file=sys.stderr)
    results = run_probes(adapter, probes(adapter, prompts), prompts.aliases, prompts.claim_prefix)
    if as_json:
        print(json.dumps({"fact": {"subject": fact.subject.label, "property": pid, "object": fact.object.label},
                          "via": "daemon" if isinstance(adapter, RemoteModel) else "local",
                          "results": [r.to_dict() for r in results]}, indent=2))
        return
    table = Table(title=esc(f"{fact.subject.label} · {pid} · expected {fact.object.label}"))
    for col in ("kind", "prompt", "prediction", "expected", "match"):
        table.add_column(col)
    for r in results:
        table.add_row(r.kind, esc(r.prompt), esc(r.prediction), esc(r.expected),
                      f"[green]yes ({esc(r.rule)})" if r.ok else "[red]no")
    console.print(table)
    ok = sum(r.ok for r in results)
    console.print(f"{ok}/{len(results)} prompts answer {esc(fact.object.label)}")


def register(app: typer.Typer) -> None:
    """Add the check command."""
    app.command("check")(check)
