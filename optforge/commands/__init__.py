"""CLI command modules; each exposes `register(app)` (see `optforge.cli.COMMAND_MODULES`)."""
