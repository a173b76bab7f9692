"""User-facing errors. Each message is one paragraph: what went wrong and how to fix it.

The entry points (``cxrtrack <command>`` and ``scripts/*.py``, through :func:`cxrtrack.cli.run_main`) print these
without a traceback and exit with the error's ``exit_code``: 2 for input the user can fix before running (a path,
a setting), 1 for a run that failed (its trackers were told so, and the message says what was kept).
"""


class CXRError(Exception):
    """An error caused by input the user can fix (a path, a setting, the environment)."""

    exit_code = 2


class ConfigError(CXRError):
    """A setting is unknown, of the wrong type or out of range."""


class DataError(CXRError):
    """The dataset is missing, laid out in a way we cannot read, or has an empty class."""


class TrackerError(CXRError):
    """A tracker could not be started (nothing has been trained yet, so nothing is lost)."""


class RunFailedError(CXRError):
    """The run started and failed (non-finite loss, disk full, ...): it ended FAILED in every tracker."""

    exit_code = 1


class NonFiniteLossError(RunFailedError):
    """The loss became NaN or infinite: training stopped at once, no such weights were saved."""
