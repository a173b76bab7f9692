#!/usr/bin/env python
"""`python scripts/download.py ...` is `cxrtrack download ...`: the code is in src/cxrtrack/cli/download.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.download import main

if __name__ == "__main__":
    run_main(main)
