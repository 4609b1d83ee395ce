"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from kbsync.config import Settings, load_settings, validate

# Stored and user text goes through esc(); emoji codes such as ":x:" in it must stay literal too.
console = Console(emoji=False)

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="Settings file (TOML) over the defaults.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model directory, or 'default' for the embedded SmolLM2.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Data directory (deltas, audit log).")]
DbOpt = Annotated[Optional[str], typer.Option("--db", help="Audit log URL (sqlite:///... or postgresql://...).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def esc(value: object) -> str:
    """Text from the audit log, the KB or the user, safe to print with rich (its [markup] shown literally)."""
    return escape(str(value))


def settings_from(config: str | None = None, model: str | None = None, data_dir: str | None = None, db: str | None = None) -> Settings:
    """Load settings and apply command-line overrides (validated like the file's: --data-dir "" is an error)."""
    s = load_settings(config)
    if model is not None:
        s.model.path = model
    if data_dir is not None:
        s.store.data_dir = data_dir
    if db is not None:
        s.store.db = db
    return validate(s)


def quiet_transformers() -> None:
    """Silence progress bars and advisory warnings from transformers on the CLI."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass
