"""`python -m pipeline` (and `torchrun -m pipeline`) run the CLI."""
from pipeline.cli.app import app

app(prog_name="pipeline")
