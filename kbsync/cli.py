"""The `kbsync` command line: a typer app assembled from kbsync.commands modules."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from kbsync.errors import KbsyncError

# Each module registers its own commands; add a module here to add commands.
COMMAND_MODULES = ["check", "kb", "edit", "audit", "consolidate", "editor", "daemon", "export"]

app = typer.Typer(
    name="kbsync",
    help="Keep a served language model's facts in step with a knowledge base.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keep a served language model's facts in step with a knowledge base."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"kbsync.commands.{_name}").register(app)


def main() -> None:
    """Entry point: run the app, turning KbsyncError into one line on stderr and an exit code."""
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except KbsyncError as e:
        print(f"kbsync: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("kbsync: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # Usage errors from click (or typer's bundled copy of it) know how to show themselves.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        if os.environ.get("KBSYNC_DEBUG"):
            raise
        print(f"kbsync: internal error: {type(e).__name__}: {e} (set KBSYNC_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
