"""`make mlflow-quick` / `make wandb-quick` are a smoke test and a first impression, cut to ~15 s (docs/speed.md):
the quick config must still learn the synthetic set it trains on by default, not just finish."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIGS

pytestmark = pytest.mark.slow

MAJORITY_SHARE = 26 / 66  # the synthetic test split's largest class (Kaggle counts): what a constant guess scores


def test_quick_config_still_learns_the_synthetic_set(tmp_path):
    """configs/quick.yaml as `make mlflow-quick` runs it (same data, seed, epochs, image size), untracked: the
    best checkpoint must beat the constant guess by a wide margin on the test split (0.77 when this was written)."""
    from cxrtrack.config import load_config
    from cxrtrack.data.synthetic import ensure_synthetic_dataset
    from cxrtrack.training.run import run_experiment

    cfg = load_config(CONFIGS / "quick.yaml")
    root = ensure_synthetic_dataset(tmp_path / "synthetic", seed=cfg["data"]["synthetic_seed"])
    cfg = load_config(CONFIGS / "quick.yaml", values={"data.path": str(root), "tracking.tracker": "none",
                                                        "output_dir": str(tmp_path / "outputs")})
    result = run_experiment(cfg)
    assert result.status == "FINISHED"
    assert result.test is not None
    assert int(result.test.confusion.sum()) == 66  # the whole synthetic test split
    acc, f1 = result.test.metrics["acc"], result.test.metrics["f1_macro"]
    assert acc >= 0.65 > MAJORITY_SHARE + 0.2, f"the quick config no longer learns: test accuracy {acc:.3f}"
    assert f1 >= 0.55, f"the quick config predicts too few classes: macro-F1 {f1:.3f}"
