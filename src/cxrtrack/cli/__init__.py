"""The command-line entry points (``cxrtrack <command>``, ``python scripts/<command>.py``) and what they share:
logging set-up, common flags, clean error exits.

Each command is a module here with a ``main() -> int`` (``cli/train.py``, ``cli/evaluate.py``, ``cli/tune.py``,
``cli/compare.py``, ``cli/replay.py``, ``cli/download.py``, ``cli/mlflow_ui.py``), run through :func:`run_main` by
``cxrtrack.console`` and by the three-line shims in ``scripts/``. Each imports torch, the trackers and the heavy
packages inside ``main()``, only after its flags and config were checked, so ``--help`` and a bad flag answer in
about a second.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import textwrap
from collections.abc import Callable

from cxrtrack import signals
from cxrtrack.errors import CXRError
from cxrtrack.provenance import RedactingFilter, redact

EXIT_USER_ERROR = 2  # bad input: a one-paragraph error naming the fix, nothing was done
EXIT_RUN_FAILED = 1  # the run failed, or a tracker does not hold all of it (the last line says what is missing)
EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM exits with 143 (128 + the signal number)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # every record, ours, MLflow's or W&B's, without credentials
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("matplotlib", "PIL", "urllib3", "alembic", "git", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--data", help="dataset folder, any supported layout "
                                       "(default: downloaded Kaggle data, else synthetic)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set training.optimizer=sgd (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def paragraph(text: str) -> str:
    # never inside a word: a path or URL cut at a hyphen or in its middle could not be copied back from the terminal
    return "\nerror: " + textwrap.fill(redact(" ".join(str(text).split())), width=100, subsequent_indent="       ",
                                       break_long_words=False, break_on_hyphens=False)


# keyed by OSError.errno, which is None for an OSError raised without one
_DISK_ERRORS: dict[int | None, str] = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def exit_fast(code: int) -> None:
    """End the process with ``code`` without Python's interpreter finalization, which takes ~2 s here once torch,
    torchvision, scikit-learn, matplotlib and MLflow are loaded (tearing down thousands of modules and objects that
    the operating system frees at once anyway). Everything an exit must do is done first: the libraries' own exit
    handlers (W&B's service shutdown, MLflow's queues, ``logging.shutdown``) run as at a normal exit, and stdout and
    stderr are flushed. Returns (a normal exit follows) if a thread that a normal exit would wait for is running."""
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # every registered handler, last registered first, as at a normal exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def run_main(main: Callable[[], int], fast_exit: bool = False) -> None:
    """Run ``main``; a :class:`CXRError` becomes one clear paragraph on stderr and its exit status (2 for bad
    input, 1 for a failed run), Ctrl-C exits 130 and SIGTERM (handled like Ctrl-C) 143. ``fast_exit`` (a training
    command, whose process loads the whole stack): end with :func:`exit_fast`, ~2 s sooner."""
    with signals.sigterm_as_interrupt():
        try:
            code = main()
        except CXRError as exc:
            print(paragraph(str(exc)), file=sys.stderr)
            code = exc.exit_code
        except KeyboardInterrupt as exc:
            print(f"\n{'terminated (' + str(exc) + ')' if isinstance(exc, signals.Terminated) else 'interrupted'}",
                  file=sys.stderr)
            code = signals.exit_status(exc)
        except OSError as exc:  # outside the paths that handle it themselves: still one paragraph, never a traceback
            what = _DISK_ERRORS.get(exc.errno, exc.strerror or type(exc).__name__)
            where = f" at {exc.filename}" if exc.filename else ""
            print(paragraph(f"Stopped: {what}{where} ({exc}). Free space or fix the permissions of that folder, or "
                            f"point output_dir / DATA elsewhere, and run again."), file=sys.stderr)
            code = EXIT_RUN_FAILED
    # only in a process the interpreter started on a script file (scripts/train.py, the cxrtrack command): a caller
    # that runs the script inside its own process (the tests, through runpy under `python -m pytest`) exits normally
    orig_argv = getattr(sys, "orig_argv", [])
    if fast_exit and len(orig_argv) > 1 and not orig_argv[1].startswith("-"):
        exit_fast(code)
    sys.exit(code)
