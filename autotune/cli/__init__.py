"""The `autotune` command line: the click app (`app.py`) and one module per command."""
