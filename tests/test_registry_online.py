"""The online-only W&B registry paths, with stand-ins for the server's calls (no network here): the champion alias
is decided against the server's current champion, the version is linked to the configured registry, and
`make evaluate MODEL=wandb:...` fetches the artifact through the API. Also the `cxrtrack` console command."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import wandb

from cxrtrack.errors import CXRError
from cxrtrack.tracking import fetch
from cxrtrack.tracking.wandb_tracker import WandbTracker
from tests.conftest import ROOT

PLAN = {"register": True, "reason": "", "source": "kaggle", "fingerprint": "f" * 16, "config": "train",
        "run_name": "r1", "git_commit": "abc", "metric": "test/f1_macro", "mode": "max",
        "metrics": {"test/f1_macro": 0.8},
        "description": "CustomCXRNet from run r1"}


class FakeRun:
    entity = "team"

    def __init__(self):
        self.logged, self.linked = [], []

    def log_artifact(self, artifact, aliases):
        self.logged.append((artifact, aliases))

    def link_artifact(self, artifact, target, aliases):
        self.linked.append((target, aliases))


class FakeApi:
    def __init__(self, champion_meta):
        self.champion_meta, self.asked = champion_meta, []

    def artifact(self, name, type=None):  # noqa: A002 - W&B's own parameter name
        self.asked.append(name)
        if self.champion_meta is None:
            raise wandb.errors.CommError("artifact not found")
        return SimpleNamespace(metadata=self.champion_meta)


class CommittedArtifact(wandb.Artifact):
    def wait(self, timeout=None):  # stand-in: the server would commit the version
        return self


def online_tracker(tmp_path, champion_meta, registry="wandb-registry-model/CustomCXRNet"):
    tracker = WandbTracker("cxr", {"model_artifact_name": "customcxrnet", "registry": registry})
    api = FakeApi(champion_meta)
    tracker._wandb = SimpleNamespace(Artifact=CommittedArtifact, Api=lambda: api)
    tracker.run, tracker.mode = FakeRun(), "online"
    (tmp_path / "best.pt").write_bytes(b"weights")
    return tracker, api


def log(tracker, tmp_path, plan=PLAN):
    tracker.log_model(None, tmp_path / "best.pt", None, {"best_epoch": 3, "registry": plan})
    return tracker.run.logged[-1][1]


@pytest.mark.parametrize(("champion", "moves"), [
    (None, True),  # no champion yet
    ({"dataset_fingerprint": "f" * 16, "test/f1_macro": "0.7"}, True),  # beaten on the same data
    ({"dataset_fingerprint": "f" * 16, "test/f1_macro": "0.9"}, False),  # better than the new one
    ({"dataset_fingerprint": "0" * 16, "test/f1_macro": "0.1"}, False),  # other data: not comparable
])
def test_online_champion_alias_follows_the_same_rule_as_mlflow(tmp_path, champion, moves):
    tracker, api = online_tracker(tmp_path, champion)
    aliases = log(tracker, tmp_path)
    assert api.asked == ["team/cxr/customcxrnet:champion"]
    assert ("champion" in aliases) is moves
    assert {"latest", "best", "epoch-3", "latest-kaggle"} <= set(aliases)
    target, linked = tracker.run.linked[0]
    assert target == "wandb-registry-model/CustomCXRNet" and "best" not in linked and "latest-kaggle" in linked


def test_offline_or_not_registering_never_asks_the_server(tmp_path):
    tracker, api = online_tracker(tmp_path, None)
    tracker.mode = "offline"
    assert "champion" not in log(tracker, tmp_path)
    tracker.mode = "online"
    assert "champion" not in log(tracker, tmp_path, {**PLAN, "register": False})
    assert api.asked == [] and tracker.run.linked == []


def test_fetch_a_wandb_artifact_reference(tmp_path):
    class Artifact:
        metadata = {"dataset_fingerprint": "f" * 16}

        def download(self, root):
            (tmp_path / "dl").mkdir()
            (tmp_path / "dl" / "best.pt").write_bytes(b"x")
            return str(tmp_path / "dl")

        def logged_by(self):
            return SimpleNamespace(id="run123", path=["team", "cxr", "run123"])

    asked = []
    api = SimpleNamespace(artifact=lambda name, type=None: asked.append(name) or Artifact())
    path, info = fetch.wandb_artifact_checkpoint("wandb:team/cxr/customcxrnet:champion", api=api)
    assert asked == ["team/cxr/customcxrnet:champion"] and path == tmp_path / "dl" / "best.pt"
    assert info["run_id"] == "run123" and info["run_path"] == "team/cxr/run123"

    def unreachable(name, type=None):
        raise wandb.errors.CommError("no network")

    with pytest.raises(CXRError, match="needs the W&B server"):
        fetch.wandb_artifact_checkpoint("wandb:team/cxr/customcxrnet:champion",
                                        api=SimpleNamespace(artifact=unreachable))


def test_model_reference_kinds():
    assert fetch.kind_of("models:/CustomCXRNet@champion") == "mlflow-model"
    assert fetch.kind_of("wandb:e/p/customcxrnet:v3") == "wandb-artifact"
    assert fetch.kind_of("outputs/x/checkpoints/best.pt") == "checkpoint"
    assert fetch.kind_of("0123456789abcdef0123456789abcdef") == "mlflow-run"
    with pytest.raises(CXRError, match="Cannot tell what"):
        fetch.kind_of("CustomCXRNet@champion")


def test_console_command_dispatches_to_the_cli_modules(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "cxrtrack", "train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--resume RUN" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cxrtrack", "trian"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr
    assert 'cxrtrack = "cxrtrack.console:main"' in (ROOT / "pyproject.toml").read_text()


def test_online_resume_asks_wandb_to_continue_the_same_run(tmp_path, monkeypatch):
    """Online, a resumed run is wandb.init(id=<run id>, resume="must")
    (offline is tested for real in test_resume.py)."""
    from cxrtrack.tracking.base import RunInfo

    calls = []

    class Run:
        id, url, entity = "abc123", "https://wandb.ai/team/cxr/runs/abc123", "team"
        settings = SimpleNamespace(sync_dir=str(tmp_path / "run"))

        def define_metric(self, *a, **k):
            pass

    fake = SimpleNamespace(init=lambda **kw: calls.append(kw) or Run(), Settings=lambda **kw: kw)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = WandbTracker("cxr", {"mode": "online", "dir": str(tmp_path)})
    tracker._wandb = fake
    tracker.start_run(RunInfo("r1", {}, resume={"wandb": "abc123"}))
    assert calls[0]["id"] == "abc123" and calls[0]["resume"] == "must" and calls[0]["mode"] == "online"
    assert tracker.run_ref()["run_id"] == "abc123"
