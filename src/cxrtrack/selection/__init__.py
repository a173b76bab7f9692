"""Honest model selection above the one training path (``training.run.run_experiment``).

- :mod:`~cxrtrack.selection.folds`: stratified k-fold splits of train/ (never test/);
- :mod:`~cxrtrack.selection.cv`: k-fold cross-validation (a parent run, one child run per fold, the CV
  mean +- std of every validation metric) and the final model: the fold ensemble or a retrain;
- :mod:`~cxrtrack.selection.seeds`: the same config with n seeds, mean +- std of the test metrics.

:func:`run` picks what a config asks for: ``training.seeds > 1`` -> seeds (each seed cross-validated when
``training.cv_folds > 1``), else ``cv_folds > 1`` -> one cross-validation, else one plain run.
``selection`` imports training, tracking and data; only the scripts and the tuning package import it.
"""

from __future__ import annotations

from typing import Any


def run(cfg: dict[str, Any], **kwargs):
    """One run, a cross-validation or a seed study, as ``cfg`` asks (see the module doc)."""
    if cfg["training"]["seeds"] > 1:
        from cxrtrack.selection.seeds import run_seeds

        return run_seeds(cfg, **kwargs)
    if cfg["training"]["cv_folds"] > 1:
        from cxrtrack.selection.cv import run_cv

        return run_cv(cfg, **kwargs)
    from cxrtrack.training.run import run_experiment

    return run_experiment(cfg, **kwargs)
