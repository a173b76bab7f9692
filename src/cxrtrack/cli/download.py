"""Download the Kaggle COVID-19 chest X-ray dataset into data/kaggle (no credentials needed)."""

from __future__ import annotations

import argparse

from cxrtrack.cli import setup_logging
from cxrtrack.config import load_config
from cxrtrack.data.download import download_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--handle", help="Kaggle handle (default: data.kaggle_handle in the config)")
    parser.add_argument("--dest", help="target folder (default: data.download_dir in the config)")
    parser.add_argument("--force", action="store_true", help="download again even if the data is present")
    args = parser.parse_args()
    setup_logging()
    data_cfg = load_config(args.config)["data"]
    location = download_dataset(args.handle or data_cfg["kaggle_handle"], args.dest or data_cfg["download_dir"],
                                args.force)
    print(f"Dataset ready: {location.root}")
    return 0
