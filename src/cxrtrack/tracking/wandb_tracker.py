"""Weights & Biases backend: online with an API key, offline automatically without one.

Mode (``tracking.wandb.mode``): ``auto`` (the default) goes online when an API key is configured
(``WANDB_API_KEY`` or ``wandb login``) and offline otherwise: no prompt, no crash, one line saying
how to upload later (``make wandb-sync``). If ``auto`` chose online but the server cannot be reached
within ``init_timeout`` seconds, the run falls back to offline. ``WANDB_MODE`` in the environment wins
over the config (and is never overridden).

What a run holds: the config; per-epoch metrics with ``epoch`` as the x-axis; a summary of best and
test metrics; the training curves, confusion-matrix and ROC figures; captioned test-prediction
images; a ``wandb.Table`` of test predictions; a native confusion-matrix chart; the model as a
versioned ``model`` artifact with aliases; and W&B's built-in system metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cxrtrack import signals
from cxrtrack.provenance import scrub_argv
from cxrtrack.tracking.base import FINISHED, KILLED, BaseTracker, Predictions, RunInfo

log = logging.getLogger(__name__)

_EXIT_CODES = {FINISHED: 0, "FAILED": 1, KILLED: 130}  # 130: the shell's code for Ctrl-C; SIGTERM: 143


class WandbStoreError(Exception):
    """W&B did not store (all of) an offline run, although its calls returned (its writer failed)."""


@contextmanager
def scrubbed_argv() -> Iterator[None]:
    """W&B records ``sys.argv`` in its run metadata when ``wandb.init`` sends its settings: during that call
    only, the command line is the scrubbed one (credentials in URLs and secret ``--set`` values masked)."""
    original = sys.argv
    sys.argv = [original[0], *scrub_argv(original[1:])] if original else original
    try:
        yield
    finally:
        sys.argv = original


# workaround(wandb): wandb.init raises without an API key and a terminal (it never falls back to offline), so
# the mode is decided here, from W&B's internal settings and netrc readers (wandb.sdk internals)
def api_key_configured() -> bool:
    """True when W&B has an API key: ``WANDB_API_KEY``, ``~/.netrc`` (``wandb login``) or W&B's settings file.

    Checked without prompting, without network and without starting W&B's service process.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        try:
            key = wbauth.read_netrc_auth(host=settings.base_url)
        except Exception:  # noqa: BLE001 - a malformed netrc entry is no usable key
            key = None
        return bool(key or settings.api_key)
    except Exception:  # noqa: BLE001 - W&B internals moved: treat as "no key" (offline is always safe)
        return False


def resolve_mode(configured: str) -> str:
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if configured != "auto":
        return configured
    return "online" if api_key_configured() else "offline"


def _shown(path: Path) -> str:
    """A path as the user can type it from here: relative when it is under the current folder."""
    import shlex

    try:
        text = str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def leet_command(run_dir: Path | None) -> str:
    """``wandb leet <run>`` as a command that works when pasted: the wandb of this Python (``.venv/bin/wandb``),
    not a bare ``wandb`` that is only on the PATH inside an activated venv."""
    import shutil

    exe = Path(sys.executable).with_name("wandb")
    on_path = shutil.which("wandb")
    if on_path and Path(on_path).resolve() == exe.resolve():
        shown = "wandb"
    else:
        shown = _shown(exe) if exe.exists() else "wandb"
    return f"{shown} leet {_shown(run_dir) if run_dir else ''}".strip()


class WandbTracker(BaseTracker):
    name = "wandb"

    def __init__(self, project: str, cfg: dict[str, Any]):
        self.project = project
        self.cfg = cfg
        self.mode: str | None = None
        self.run: Any = None  # the wandb.Run of start_run or attach
        self._wandb: Any = None  # the wandb module, imported by setup (only then: it takes seconds)
        self._files: list[tuple[Path, str]] = []
        self._run_dir: Path | None = None
        self._run_id: str | None = None
        self._url: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self):
        import wandb

        self._wandb = wandb

    def start_run(self, run: RunInfo):
        wandb = self._wandb
        tags = run.tags
        # "auto" decided the mode (the config asked for it and WANDB_MODE did not force one)
        auto = self.cfg.get("mode", "auto") == "auto" and not os.environ.get("WANDB_MODE")
        self.mode = resolve_mode(self.cfg.get("mode", "auto"))
        # auto chose online because a key exists; if the server cannot be reached, fall back to offline.
        # workaround(wandb): a key but no reachable server fails init; auto mode retries offline
        fallback = auto and self.mode == "online"
        notes = f"git {tags.get('git_commit', 'unknown')[:12]} dirty={tags.get('git_dirty')}"
        init = dict(
            project=self.project,
            entity=self.cfg.get("entity") or None,
            name=run.name,
            config={**run.config, "run_tags": tags},
            tags=[f"{k}:{v}"[:64] for k, v in tags.items() if k in ("dataset_source", "config", "device")],
            notes=f"{run.description}\n{notes}" if run.description else notes,
            dir=str(self._root()),
            group=run.group,
            job_type=run.job_type,
        )
        resuming = run.resume.get(self.name)
        if resuming:  # the same run id: online W&B continues the run; offline writes a new folder with that id
            init.update(id=resuming, resume="must" if self.mode == "online" else "allow")
        try:
            with scrubbed_argv():
                self.run = wandb.init(mode=self.mode, settings=self._settings(), **init)
        except Exception as exc:
            if not fallback:
                raise
            log.warning("W&B: could not reach the server (%s: %s); logging this run offline instead.",
                        type(exc).__name__, str(exc).splitlines()[0][:200])
            self.mode = "offline"
            if resuming:
                init["resume"] = "allow"
            with scrubbed_argv():
                self.run = wandb.init(mode="offline", settings=self._settings(), **init)
        self._run_dir = Path(self.run.settings.sync_dir)
        self._run_id = self.run.id
        self._url = self.run.url if self.mode == "online" else None
        # the epoch axis only for the per-epoch metrics (defined as each first appears in log_metrics): a "*" rule
        # would also put tables and images on it, drawn as single-point charts
        self.run.define_metric("epoch", hidden=True)
        self._defined: set[str] = set()
        if resuming:
            log.info("W&B: continuing run %s%s.", resuming,
                     f" offline in a new folder {self._run_dir} (the same run id: `make wandb-sync` appends it to the "
                     f"run)" if self.mode == "offline" else "")
        if self.mode == "offline":
            reason = "no API key is configured, so " if auto else ""
            log.info("W&B: %slogging offline to %s; upload it later with `make wandb-sync`.", reason, self._run_dir)

    def attach(self, ref: dict[str, Any], reopen: bool = True, job_type: str | None = None) -> None:
        """Continue the run of ``ref`` (``run_ref()`` of the tracker that created it) by its id (``resume="allow"``):
        online W&B resumes the run; offline writes a new folder with the same run id, which `make wandb-sync` appends
        to the run. W&B reopens either way (``reopen`` is MLflow's distinction). The folder goes beside the run's
        own (``<dir>/wandb/``); ``job_type`` names what this part of the run does (``evaluation``)."""
        wandb = self._wandb
        self.mode = os.environ.get("WANDB_MODE") or ref.get("mode") or resolve_mode("auto")
        run_dir = ref.get("run_dir")
        root = Path(run_dir).parents[1] if run_dir else Path(".")  # <dir>/wandb/offline-run-*/files -> <dir>
        if run_dir and Path(run_dir).name == "files":
            root = Path(run_dir).parents[2]
        self.project = ref.get("project") or self.project
        self.run = wandb.init(project=ref.get("project"), id=ref["run_id"], resume="allow", mode=self.mode,
                              dir=str(root), job_type=job_type, settings=wandb.Settings(silent=True))
        self._run_dir, self._run_id = Path(self.run.settings.sync_dir), self.run.id
        self._defined = set()

    def abandon(self) -> None:
        """Close this process's part of the run without a status of ours (the summary's ``status`` stays as the
        training run set it). W&B cannot let a run go without finishing it: it records exit code 0 for this part."""
        if self.run is not None:
            self.run.finish()
            self.run = None

    def _root(self) -> Path:
        root = Path(self.cfg.get("dir") or ".").expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)  # workaround(wandb): init warns when dir= does not exist yet
        return root

    def _settings(self):
        return self._wandb.Settings(
            silent=True,  # we print one line of our own instead of W&B's banner
            # Console capture holds what the terminal shows: the project's and MLflow's lines are redacted at the
            # source (URLs, secrets), and W&B records the command line scrubbed (scrubbed_argv).
            # One run per init, never the previous one returned or finished: a cross-validation's parent run stays
            # open while its fold runs start and end (W&B's default outside notebooks returns the open run instead).
            reinit="create_new",
            init_timeout=float(self.cfg.get("init_timeout") or 30),
            x_stats_sampling_interval=float(self.cfg.get("system_metrics_interval") or 15),
            x_transaction_log_flush_interval=5.0,  # a hard kill loses at most ~5 s of an offline run
        )

    @property
    def run_dir(self) -> Path | None:
        """The local run folder (``wandb/offline-run-*``), readable with ``wandb leet inspect``."""
        return self._run_dir

    def flush(self):
        """Log the files collected by :meth:`log_artifact` as one version of the ``run-files`` artifact."""
        if self.run is not None and self._files:
            files = self._wandb.Artifact(f"run-files-{self.run.id}", type="run-files",
                                         description="checkpoint, history, config and reports of this run")
            for path, name in self._files:
                files.add_file(str(path), name=name)
            self.run.log_artifact(files)
            self._files = []

    def end_run(self, status=FINISHED):
        if self.run is not None:
            self.flush()
            self.run.summary["status"] = status
            code = signals.exit_status() if status == KILLED and signals.received() else _EXIT_CODES.get(status, 1)
            self.run.finish(exit_code=code)
            self.run = None
            if self.mode == "offline" and self.cfg.get("verify_offline", True):
                self._verify_offline(code)

    def _verify_offline(self, exit_code: int) -> None:
        """W&B's writer reports a failure (a full disk) only in its own log, and ``finish`` returns as if all was
        well: read the run back (``wandb leet``, ~0.6 s) and raise if its end is not in the file."""
        from cxrtrack.tracking.readback import wandb_leet

        run_dir = self._run_dir
        if run_dir is None:  # no run was started: nothing to read back
            return
        stored, reason = None, ""
        try:
            stored = json.loads(wandb_leet(run_dir, "--summary", timeout=60)).get("exit_code")
        except Exception as exc:  # noqa: BLE001 - an unreadable run is what this check is for
            reason = f"it cannot be read back: {type(exc).__name__}"
        if stored == exit_code:
            return
        log_file = run_dir / "logs" / "debug-internal.log"
        try:
            errors = [line for line in log_file.read_text(errors="replace").splitlines() if '"level":"ERROR"' in line]
            if errors:  # e.g. "writer: ...: write <path>/run-x.wandb: no space left on device": keep the cause
                first = json.loads(errors[0]).get("msg", errors[0])
                reason = f"its writer failed: {first.rsplit(': ', 1)[-1][:200]}"
        except (OSError, ValueError):
            pass
        raise WandbStoreError(f"W&B did not store the end of the offline run in {run_dir} "
                              f"({reason or 'no exit record'}); what W&B wrote before that is all it holds")

    # -- logging ----------------------------------------------------------------------------------
    def log_params(self, params):
        self.run.config.update(params, allow_val_change=True)  # nested: W&B shows sections as groups

    def log_metrics(self, metrics, step, timestamp_ms=None):
        # timestamp_ms is not passed on: W&B stamps each history row itself (its offline runs are never spooled)
        for key in metrics.keys() - self._defined:
            self.run.define_metric(key, step_metric="epoch")
            self._defined.add(key)
        self.run.log({**metrics, "epoch": step})

    def log_summary(self, metrics):
        for key, value in metrics.items():
            if not (isinstance(value, float) and math.isnan(value)):
                self.run.summary[key] = value

    def set_tags(self, tags):
        # merged: config.update replaces the whole "run_tags" value, which would drop the run's earlier tags
        merged = {**dict(self.run.config.get("run_tags") or {}), **tags}
        self.run.config.update({"run_tags": merged}, allow_val_change=True)

    def log_artifact(self, path, artifact_path=None):
        # Collected into one versioned artifact at the end of the run (W&B copies the files, so the
        # run keeps them even if outputs/ is deleted before `wandb sync`).
        name = Path(path).name if artifact_path is None else f"{artifact_path}/{Path(path).name}"
        self._files.append((Path(path), name))

    def log_dataset(self, dataset):
        """A ``dataset`` artifact that references the data folder (file:// reference: W&B records each file's
        checksum, no image is uploaded), with the fingerprint and class counts as metadata. Online the run
        ``use_artifact``s it (an input in the lineage graph); offline W&B refuses ``use_artifact``, so the run
        logs it instead (it appears among the run's logged artifacts after `make wandb-sync`)."""
        wandb = self._wandb
        metadata = {"source": dataset["source"], "fingerprint": dataset["fingerprint"], "root": dataset["root"],
                    "test_split": dataset.get("test_split"), "splits": dataset["splits"],
                    "used_as": "input" if self.mode != "offline" else "logged (offline: use_artifact is online only)"}
        artifact = wandb.Artifact(dataset["name"], type="dataset", metadata=metadata,
                                  description=f"{dataset['source']} chest X-ray images, "
                                              f"fingerprint {dataset['fingerprint']} "
                                              f"(a reference to {dataset['root']}; no image copied)")
        artifact.add_reference(Path(dataset["root"]).resolve().as_uri(), name="images", max_objects=100_000)
        aliases = [f"fp-{dataset['fingerprint']}"]
        if self.mode == "offline":
            self.run.log_artifact(artifact, aliases=aliases)
        else:
            self.run.use_artifact(artifact, aliases=aliases)

    def log_image(self, path, name, caption=None):
        self.run.log({name.removesuffix(".png"): self._wandb.Image(str(path), caption=caption)})

    def log_predictions(self, predictions: Predictions):
        wandb, p = self._wandb, predictions
        n = len(p.y_true)
        columns = ["image", "file", "true", "pred", "correct", *[f"p_{c}" for c in p.class_names]]
        table = wandb.Table(columns=columns)
        for i in range(n):
            table.add_data(
                wandb.Image(p.images[i]), Path(p.paths[i]).name, p.class_names[p.y_true[i]],
                p.class_names[p.y_pred[i]], bool(p.y_true[i] == p.y_pred[i]), *map(float, p.probs[i]),
            )
        k = min(n, p.extra.get("n_grid", 16))
        self.run.log({
            "test/predictions": table,
            "test/prediction_images": [wandb.Image(p.images[i], caption=p.caption(i)) for i in range(k)],
            "test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=p.y_true.tolist(), preds=p.y_pred.tolist(), class_names=list(p.class_names)
            ),
        })

    def log_table(self, name, rows):
        import pandas as pd

        self.run.log({name: self._wandb.Table(dataframe=pd.DataFrame(rows))})

    def log_model(self, model, checkpoint, input_example, metadata):
        """The checkpoint as a versioned ``model`` artifact. Aliases mean what they mean in the MLflow registry
        (:mod:`cxrtrack.tracking.registry`): ``latest-<source>`` always; ``champion`` only online, when the new
        version beats the current ``champion`` version (read from the server) on the same dataset fingerprint;
        online and registering, the version is also linked to the W&B registry. Offline there is no server to
        read the champion from, so it is not moved (and `make wandb-sync` does not move it either)."""
        from cxrtrack.tracking.registry import CHAMPION, REGISTRY_KEY, beats, latest_alias, version_tags

        wandb = self._wandb
        metadata = dict(metadata)
        plan = metadata.pop(REGISTRY_KEY, None)
        name = self.cfg.get("model_artifact_name") or "customcxrnet"
        best_epoch = metadata.get("best_epoch")
        aliases = ["latest", "best", *([f"epoch-{best_epoch}"] if best_epoch is not None else [])]
        description = "CustomCXRNet best checkpoint (state_dict + hyperparameters)"
        if plan is not None:
            metadata.update({k: v for k, v in version_tags(plan).items() if k not in metadata})
            metadata["registered"] = bool(plan["register"])
            aliases.append(latest_alias(plan["source"]))
            description = plan["description"]
            if plan["register"] and self.mode == "online":
                moved, why = beats(plan, self._current_champion(name))
                if moved:
                    aliases.append(CHAMPION)
                log.info("W&B: %s", f"'{name}' is the new champion ({why})" if moved else f"champion not moved: {why}")
            elif plan["register"]:
                log.info("W&B: offline, so the champion alias is not moved (it needs the server's current champion); "
                         "aliases: %s.", ", ".join(aliases))
        artifact = wandb.Artifact(name, type="model", metadata=metadata, description=description)
        artifact.add_file(str(checkpoint), name="best.pt")
        self.run.log_artifact(artifact, aliases=aliases)
        if plan is not None and plan["register"] and self.mode == "online" and self.cfg.get("registry"):
            try:  # the W&B registry (online only); a failure leaves the artifact in the project
                artifact.wait()
                self.run.link_artifact(artifact, self.cfg["registry"], aliases=[a for a in aliases if a != "best"])
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B: could not link the model to the registry %s (%s).", self.cfg["registry"], exc)

    def _current_champion(self, name: str) -> dict[str, str] | None:
        """The metadata of the artifact version aliased ``champion`` on the server (online), or None."""
        try:
            api = self._wandb.Api()
            entity = self.cfg.get("entity") or self.run.entity
            found = api.artifact(f"{entity}/{self.project}/{name}:champion", type="model")
        except Exception:  # noqa: BLE001 - no champion yet (W&B raises CommError) or unreachable: treat as none
            return None
        return {k: str(v) for k, v in (found.metadata or {}).items()}

    def run_ref(self):
        return {"mode": self.mode, "project": self.project, "run_id": self._run_id,
                "run_dir": str(self._run_dir) if self._run_dir else None, "url": self._url}

    def describe(self):
        if self.mode == "offline":
            return f"W&B offline run in {self.run_dir} (inspect: {leet_command(self.run_dir)}; upload: make wandb-sync)"
        return f"W&B {self.mode} run in project '{self.project}'" + (f" at {self._url}" if self._url else "")
