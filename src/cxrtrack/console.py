"""The ``cxrtrack`` command (``[project.scripts]``): ``cxrtrack train|evaluate|tune|compare|replay|mlflow-ui ...``.

Each subcommand is the script of the same name in the project's ``scripts/`` folder, run with the arguments that
follow it (``cxrtrack train --config configs/quick.yaml`` is ``python scripts/train.py --config configs/quick.yaml``).
The package is installed editable from its checkout (``make install``), so the scripts are found beside it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

COMMANDS = {"train": "train.py", "evaluate": "evaluate.py", "tune": "tune.py", "compare": "compare.py",
            "replay": "replay.py", "download": "download.py", "mlflow-ui": "mlflow_ui.py"}
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
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
    script = SCRIPTS / COMMANDS[command]
    if not script.is_file():
        print(f"error: {script} is missing: the cxrtrack command runs the scripts of its source checkout; install the "
              f"project editable from its folder (make install, or pip install -e .).", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"cxrtrack {command}", *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
