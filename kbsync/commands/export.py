"""`kbsync export DIR`: the served model (base + applied edits) as a Hugging Face directory for inference engines."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kbsync.commands.common import ConfigOpt, DataDirOpt, DbOpt, JsonOpt, ModelOpt, console, esc, quiet_transformers, settings_from


def export(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="Where to write the model: a new or empty directory, or a previous export (replaced).")],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the served model (base weights + applied edits, in order) as a Hugging Face directory with a model card.

    Loads with transformers.AutoModelForCausalLM.from_pretrained(DIR) or `vllm serve DIR`, bit for
    bit the served weights. Reads the data directory read-only, so it works while a daemon runs.
    """
    quiet_transformers()
    from kbsync.export import export_store

    settings = settings_from(config, model, data_dir, db)
    # A bad destination fails with one line before the model is loaded.
    result = export_store(settings, directory)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    n = len(result.edits)
    console.print(esc(f"exported {n} applied edit{'s' if n != 1 else ''} on {result.base_model} "
                      f"(base fingerprint {result.base_fingerprint}) to {result.path}"
                      + (" (replacing the previous export)" if result.replaced else "")))
    for e in result.edits:
        console.print(esc(f"  edit {e.id}: {e.fact} -> {e.target} ({e.method}, delta {e.delta_sha256[:12]})"))
    console.print(esc(f"weights fingerprint {result.weights_fingerprint} ({result.dtype}); "
                      f"model card {result.path / 'README.md'}; {result.seconds:.1f} s"))


def register(app: typer.Typer) -> None:
    """Add the export command."""
    app.command("export")(export)
