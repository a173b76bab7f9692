"""The ``cxrtrack`` command (``[project.scripts]``): ``cxrtrack train|evaluate|tune|compare|replay|mlflow-ui ...``.

Each subcommand is the ``main()`` of the module of the same name in :mod:`cxrtrack.cli`, run with the arguments that
follow it (``cxrtrack train --config configs/quick.yaml`` is ``python scripts/train.py --config configs/quick.yaml``).
It lives in the package, so the command works from any install (a wheel, an editable checkout); relative paths
(``configs/...``, ``outputs/``) are read from the current folder, as the scripts read them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "train", "evaluate": "evaluate", "tune": "tune", "compare": "compare", "replay": "replay",
            "download": "download", "mlflow-ui": "mlflow_ui"}  # command -> module in cxrtrack.cli
USAGE = (f"usage: cxrtrack {{{','.join(COMMANDS)}}} [options]\n"
         f"       cxrtrack <command> --help   shows the options of one command")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\n\nerror: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        sys.exit(2)
    from cxrtrack.cli import run_main

    module = importlib.import_module(f"cxrtrack.cli.{COMMANDS[command]}")  # only the command asked for
    sys.argv = [f"cxrtrack {command}", *rest]
    run_main(module.main, fast_exit=command == "train")  # as scripts/train.py: cli.exit_fast


if __name__ == "__main__":
    main()
