"""What every entry point in scripts/ shares: logging set-up, common flags, clean error exits."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable

from cxrtrack.errors import CXRError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("matplotlib", "PIL", "urllib3", "alembic", "git", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--data", help="dataset folder, any supported layout (default: downloaded Kaggle data, else synthetic)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set training.optimizer=sgd (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_main(main: Callable[[], int]) -> None:
    """Run ``main``; a :class:`CXRError` becomes one clear paragraph on stderr and exit status 2."""
    try:
        code = main()
    except CXRError as exc:
        print("\nerror: " + textwrap.fill(str(exc), width=100, subsequent_indent="       "), file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
