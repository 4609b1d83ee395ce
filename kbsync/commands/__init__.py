"""CLI command modules; each exposes register(app) and is listed in kbsync.cli.COMMAND_MODULES."""
