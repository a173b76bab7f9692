#!/usr/bin/env python
"""`python scripts/mlflow_ui.py ...` is `cxrtrack mlflow-ui ...`: the code is in src/cxrtrack/cli/mlflow_ui.py."""
from cxrtrack.cli import run_main
from cxrtrack.cli.mlflow_ui import main

if __name__ == "__main__":
    run_main(main)
