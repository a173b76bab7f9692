#!/usr/bin/env python
"""`python scripts/evaluate.py ...` is `cxrtrack evaluate ...`: the code is in src/cxrtrack/cli/evaluate.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.evaluate import main

if __name__ == "__main__":
    run_main(main)
