"""Model registry lifecycle: whether a run registers its model, what a version carries, where the aliases go.

Registration is a decision (``tracking.register``), not a side effect of every run:

- ``auto`` (the default) registers full training on real data; runs on the generated synthetic set do not,
  and ``configs/quick.yaml`` (the quick targets) sets ``false``. Such runs still log their model to the run.
- ``true`` / ``false`` force it.

A registered version carries tags (dataset source and fingerprint, config name, git commit, run name, the
test metrics) and a one-line description. Aliases, the same on MLflow and W&B:

- ``latest-<source>`` (``latest-kaggle``, ``latest-local``, ...): the newest version trained on that source.
- ``champion``: moves to the new version only when it beats the current champion on
  ``tracking.champion_metric`` (``tracking.champion_mode``) measured on the **same** dataset fingerprint
  (test metrics on different data are not comparable). The first registered version becomes champion.
  A version tested on a split carved out of a folder with no official ``test/`` says so in its description and
  its ``test_split`` tag, and never displaces a champion measured on an official test split.

The plan travels inside ``log_model``'s ``metadata`` under the key ``"registry"`` (plain values only), so a
spooled ``log_model`` call replays with the same decision. Every path that logs a model builds that metadata
with :func:`model_metadata` (a run, a cross-validation's parent, a tuning study's best trial; a seed study logs
none), and a backend registers nothing without a plan: this module is the one place the decision is made.
Nothing here imports MLflow or W&B at import time.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

REGISTRY_KEY = "registry"  # the key of the plan in log_model's metadata
CHAMPION = "champion"


def should_register(cfg: dict[str, Any], data_source: str) -> tuple[bool, str]:
    """(register?, why) for a run of ``cfg`` on data of ``data_source``."""
    setting = cfg["tracking"]["register"]
    if not cfg["tracking"]["mlflow"].get("registered_model_name"):
        return False, "tracking.mlflow.registered_model_name is null"
    if setting is True:
        return True, "tracking.register=true"
    if setting is False:
        return False, f"tracking.register=false in config {cfg.get('config_name', '?')}"
    if data_source == "synthetic":
        return False, "the data is the generated synthetic set (tracking.register=auto registers real data only)"
    return True, f"tracking.register=auto and the data is real ({data_source})"


CARVED_NOTE = ("on a split carved out of train/ (the data folder has no official test/ split): "
               "not comparable with a score on an official test split")


def build_plan(cfg: dict[str, Any], *, source: str, fingerprint: str, run_name: str, git_commit: str,
               test_metrics: dict[str, float], test_split: str = "official") -> dict[str, Any]:
    """The registration plan a run hands to its trackers (inside log_model's metadata). ``test_split`` is the
    dataset's: ``official``, ``carved`` or ``none``."""
    register, reason = should_register(cfg, source)
    metric = cfg["tracking"]["champion_metric"]
    value = test_metrics.get(metric)
    metrics = {k: float(v) for k, v in test_metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
    finite = isinstance(value, (int, float)) and math.isfinite(float(value))
    shown = f"{metric} {value:.4f}" if finite else "no test metric"
    if test_split == "carved" and metrics:
        shown += f" {CARVED_NOTE}"
    return {
        "register": register,
        "reason": reason,
        "source": source,
        "fingerprint": fingerprint,
        "config": str(cfg.get("config_name", "")),
        "run_name": run_name,
        "git_commit": git_commit,
        "metric": metric,
        "mode": cfg["tracking"]["champion_mode"],
        "metrics": metrics,
        "test_split": test_split,
        "description": (f"CustomCXRNet from run {run_name} (config {cfg.get('config_name', '?')}) on {source} data "
                        f"{fingerprint}: {shown}"),
    }


def model_metadata(cfg: dict[str, Any], facts: dict[str, Any], *, source: str, fingerprint: str, run_name: str,
                   git_commit: str, test_metrics: dict[str, float], test_split: str = "official") -> dict[str, Any]:
    """``log_model``'s metadata: the model's ``facts`` (best epoch, image size, ...), its data, its test metrics
    (none for a model that was never tested, e.g. a tuning study's best trial) and the registration plan."""
    return {**facts, "dataset_source": source, "dataset_fingerprint": fingerprint,
            **{k: v for k, v in test_metrics.items() if "/" in k},
            REGISTRY_KEY: build_plan(cfg, source=source, fingerprint=fingerprint, run_name=run_name,
                                     git_commit=git_commit, test_metrics=test_metrics, test_split=test_split)}


def version_tags(plan: dict[str, Any]) -> dict[str, str]:
    """Tags of a registered version (strings, as both registries store them)."""
    tags = {"dataset_source": plan["source"], "dataset_fingerprint": plan["fingerprint"], "config": plan["config"],
            "git_commit": plan["git_commit"], "run_name": plan["run_name"], "champion_metric": plan["metric"],
            "test_split": plan.get("test_split", "official")}  # plans spooled before the key existed: official
    tags.update({k: repr(float(v)) for k, v in plan["metrics"].items()})
    return tags


def latest_alias(source: str) -> str:
    return f"latest-{''.join(c if c.isalnum() else '-' for c in source.lower())}"


def beats(plan: dict[str, Any], current: dict[str, str] | None) -> tuple[bool, str]:
    """Does the new version (``plan``) take the champion alias from the version whose tags are ``current``?"""
    metric, mode = plan["metric"], plan["mode"]
    new = plan["metrics"].get(metric)
    if new is None:
        return False, f"the new version has no {metric}"
    if current is None:
        return True, "there was no champion"
    if plan.get("test_split", "official") != "official" and current.get("test_split", "official") == "official":
        return False, ("this version was tested on a split carved out of train/, the champion on an official test "
                       "split: a carved split never displaces it")
    if current.get("dataset_fingerprint") != plan["fingerprint"]:
        return False, (f"the champion was tested on other data (fingerprint {current.get('dataset_fingerprint')}, this "
                       f"version {plan['fingerprint']}): test metrics on different data are not comparable")
    try:
        old = float(current[metric])
    except (KeyError, ValueError):
        return True, f"the champion has no {metric} tag"
    better = new > old if mode == "max" else new < old
    word = "beats" if better else "does not beat"
    return better, f"{metric} {new:.4f} {word} the champion's {old:.4f}"


def apply_mlflow_lifecycle(client, name: str, version: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Tag and describe a freshly registered MLflow version and move its aliases. Returns what was done."""
    from mlflow.exceptions import MlflowException

    for key, value in version_tags(plan).items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=plan["description"])
    aliases = [latest_alias(plan["source"])]
    client.set_registered_model_alias(name, aliases[0], version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    moved, why = beats(plan, dict(current.tags) if current is not None else None)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    return {"version": str(version), "aliases": aliases, "champion": moved, "why": why,
            "champion_version": str(version) if moved else (current.version if current is not None else None)}
