"""``make download``: fetch the Kaggle dataset with kagglehub into the project's data folder.

Offline it fails fast, in one paragraph, and names the alternatives. Data already in the project's
data folder (or a versioned handle already in kagglehub's cache) is found without the network.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

from cxrtrack.data.layout import DatasetLocation, locate_dataset
from cxrtrack.errors import DataError

log = logging.getLogger(__name__)

KAGGLE_HOST = "www.kaggle.com"


def kaggle_reachable(timeout: float = 5.0) -> bool:
    """Can we open a TCP connection to Kaggle? (kagglehub itself would retry for much longer.)

    Behind an HTTP(S) proxy a direct connection proves nothing, so we let kagglehub try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection((KAGGLE_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _existing(folder: Path) -> DatasetLocation | None:
    if not folder.is_dir():
        return None
    try:
        return locate_dataset(folder)
    except DataError:
        return None


def _offline_error(handle: str, target: Path, reason: str) -> DataError:
    return DataError(
        f"Could not download the Kaggle dataset '{handle}' ({reason}). `make download` needs network access "
        f"to kaggle.com; the dataset is public, so no Kaggle credentials are required. Fix: connect to the "
        f"network and run `make download` again, or copy an existing download into {target} (any layout "
        f"holding Covid19-dataset/ or train/ and test/ works), or pass DATA=<folder> to the training targets. "
        f"Without real data, the training targets use the generated synthetic set (results mean nothing clinically)."
    )


def download_dataset(handle: str, target: str | Path, force: bool = False,
                     check_network=kaggle_reachable) -> DatasetLocation:
    """Download ``handle`` into ``target`` (skipped when a complete dataset is already there)."""
    target = Path(target)
    found = _existing(target)
    if found is not None and not force:
        log.info("Dataset already present in %s (train: %s, test: %s); nothing to download.",
                 target, found.train_dir, found.test_dir)
        return found

    import kagglehub

    if not check_network():
        reason = f"no network: cannot reach {KAGGLE_HOST}"
        if "/versions/" not in handle:  # only a versioned handle can be served from kagglehub's cache offline
            raise _offline_error(handle, target, reason)
        try:
            cached = Path(kagglehub.dataset_download(handle))
        except Exception as exc:  # noqa: BLE001 - any kagglehub failure offline means "not cached"
            raise _offline_error(handle, target, reason) from exc
        log.info("No network, but kagglehub's cache holds %s at %s; copying it into %s.", handle, cached, target)
        shutil.copytree(cached, target, dirs_exist_ok=True)  # where the training targets look for it
        return locate_dataset(target)

    target.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(kagglehub.dataset_download(handle, force_download=force, output_dir=str(target)))
    except Exception as exc:  # noqa: BLE001 - report any network/API failure the same clear way
        raise _offline_error(handle, target, f"{type(exc).__name__}: {exc}") from exc
    location = locate_dataset(path)
    log.info("Downloaded %s to %s", handle, location.root)
    return location
