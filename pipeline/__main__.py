"""`python -m kdpipe ...`: the command line (cli.py)."""

from .cli import main

main()
