"""Stratified k-fold splits of train/ (never of test/), and the per-fold datasets built from the one cache."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
import torch

from cxrtrack.data.dataset import CXRData, CXRDataset, DecodedSplit
from cxrtrack.data.transforms import build_transforms
from cxrtrack.errors import DataError


def train_pool(data: CXRData) -> DecodedSplit:
    """Every image of train/ (the training and validation splits of ``data`` together; never the test split),
    in path order, so the folds depend on the seed only, not on how ``data`` happened to be split."""
    parts = [data.train.split] + ([data.val.split] if data.val is not None else [])
    paths = [p for s in parts for p in s.paths]
    labels = [y for s in parts for y in s.labels]
    images = torch.cat([s.images for s in parts])
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))
    return DecodedSplit(images[order], [labels[i] for i in order], [paths[i] for i in order])


def stratified_folds(labels: list[int], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, validation indices) of each of ``k`` stratified folds (scikit-learn's StratifiedKFold,
    shuffled with ``seed``): the validation parts are disjoint and together cover every image exactly once."""
    from sklearn.model_selection import StratifiedKFold

    counts = Counter(labels)
    smallest = min(counts.values())
    if smallest < k:
        raise DataError(
            f"{k}-fold cross-validation needs at least {k} training images of every class; the smallest class has "
            f"{smallest}. Use fewer folds (FOLDS=, training.cv_folds) or add images.")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in skf.split(np.zeros(len(labels)), labels)]


def fold_data(data: CXRData, pool: DecodedSplit, train_idx, val_idx, data_cfg: dict[str, Any]) -> CXRData:
    """``data`` with the training and validation splits of one fold (the same test split, untouched)."""
    train_tf, eval_tf = build_transforms(data_cfg)
    val = CXRDataset(pool.subset(val_idx), eval_tf) if val_idx is not None else None
    return dataclasses.replace(data, train=CXRDataset(pool.subset(train_idx), train_tf), val=val,
                               test=CXRDataset(data.test.split, eval_tf))
