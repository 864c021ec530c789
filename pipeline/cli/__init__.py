"""The Typer commands, one module per group of stages; `app` is the entry point."""
