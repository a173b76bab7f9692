"""User-facing errors. Each message is one paragraph: what went wrong and how to fix it.

The entry points in ``scripts/`` print these without a traceback and exit with status 2.
"""


class CXRError(Exception):
    """An error caused by input the user can fix (a path, a setting, the environment)."""


class ConfigError(CXRError):
    """A setting is unknown, of the wrong type or out of range."""


class DataError(CXRError):
    """The dataset is missing, laid out in a way we cannot read, or has an empty class."""


class TrackerError(CXRError):
    """A tracker could not be started (nothing has been trained yet, so nothing is lost)."""
