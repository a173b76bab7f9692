#!/usr/bin/env python
"""`python scripts/compare.py ...` is `cxrtrack compare ...`: the code is in src/cxrtrack/cli/compare.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.compare import main

if __name__ == "__main__":
    run_main(main)
