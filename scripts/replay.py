#!/usr/bin/env python
"""`python scripts/replay.py ...` is `cxrtrack replay ...`: the code is in src/cxrtrack/cli/replay.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.replay import main

if __name__ == "__main__":
    run_main(main)
