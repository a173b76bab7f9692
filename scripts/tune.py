#!/usr/bin/env python
"""`python scripts/tune.py ...` is `cxrtrack tune ...`: the code is in src/cxrtrack/cli/tune.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.tune import main

if __name__ == "__main__":
    run_main(main)
