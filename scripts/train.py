#!/usr/bin/env python
"""`python scripts/train.py ...` is `cxrtrack train ...`: the code is in src/cxrtrack/cli/train.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.train import main

if __name__ == "__main__":
    run_main(main, fast_exit=True)  # ~2 s of interpreter teardown skipped (cli.exit_fast)
