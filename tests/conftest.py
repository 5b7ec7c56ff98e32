"""Shared fixtures. Prefect never touches ~/.prefect: PREFECT_HOME is a fresh temporary directory for
the whole session, set before anything imports prefect. Services (Prefect server, MLflow server) are
started by fixtures in tests/services.py and stopped in their teardown, by PID. The session fails if it
leaves anything in the repository's working tree (tests/worktree.py), ignored files included."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="amct-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # in-process flows: logs stay local; no late sends to a stopped server
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(_SESSION_DIR / "hypothesis")  # not ./.hypothesis in the repository

# Prefect sets up its log handlers when its main API is first imported, bound to the sys.stderr of that
# moment. Import it now, with the session's stderr, not inside a test whose captured stderr (capsys) is
# closed when the test ends (a later flow run would then log to a closed file).
import prefect.main  # noqa: E402, F401

_REPO = Path(__file__).resolve().parents[1]


def _worktree_snapshot():
    from tests import worktree

    return worktree.snapshot(_REPO)


_WORKTREE_BEFORE = _worktree_snapshot()


@pytest.fixture(scope="session", autouse=True)
def repository_left_clean():
    """Set up before every other fixture, so this check runs after all of them are torn down (services
    stopped, temporary stores gone): the working tree is as the session found it."""
    yield
    if _WORKTREE_BEFORE is None:
        return
    from tests import worktree

    left = worktree.changes(_WORKTREE_BEFORE, _worktree_snapshot())
    assert not left, ("the test session changed the repository's working tree (tests must write to temporary "
                      "directories):\n  " + "\n  ".join(left[:40]))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine is shared: one torch thread for a module's tests, restored afterwards. A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_server(session_dir):
    """One real `prefect server` for the session (SQLite in its own PREFECT_HOME), on a free port."""
    from tests import services

    svc = services.start_prefect_server(session_dir / "prefect-server-home")
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def prefect_api(prefect_server):
    """Point this process's Prefect client at the session's server (flows called in-process run there)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield prefect_server.url


@pytest.fixture(scope="session")
def mlflow_server(session_dir):
    """One real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts) for the session."""
    from tests import services

    svc = services.start_mlflow_server(session_dir / "mlflow-server")
    try:
        yield svc
    finally:
        svc.stop()


@dataclass
class DistilledCheckpoint:
    """A distilled model on disk, as the flow takes it."""

    checkpoint: str
    model: str
    model_kwargs: dict
    distill_config: str
    input_shape: list
    state_dict_keys: list

    def params(self, output_dir, **extra) -> dict:
        p = dict(checkpoint=self.checkpoint, model=self.model, model_kwargs=self.model_kwargs,
                 distill_config=self.distill_config, input_shape=self.input_shape, output_dir=str(output_dir),
                 name="cnn", input_names=["input"], output_names=["logits"],
                 dynamic_axes={"input": [0], "logits": [0]})
        p.update(extra)
        return p


@pytest.fixture(scope="session")
def cnn_checkpoint(session_dir) -> DistilledCheckpoint:
    """tests.models' SmallCNN (conv+BN folds, depthwise, dilated, residual, Linear head), QAT-wrapped,
    calibrated, saved as a state_dict with torch.save."""
    import torch

    from tests import models

    d = session_dir / "cnn-checkpoint"
    d.mkdir(parents=True, exist_ok=True)
    qat = models.make_qat("cnn", d)
    ckpt = d / "cnn_distilled.pt"
    torch.save(qat.state_dict(), ckpt)
    return DistilledCheckpoint(str(ckpt), "tests.models:build", {"name": "cnn"}, str(d / "cnn_distill_config.json"),
                               [1, 3, 16, 16], list(qat.state_dict()))


@pytest.fixture(scope="session")
def mlp_export(session_dir) -> Path:
    """tests.models' MLP, QAT-wrapped and exported with save_distill_model (input 'x', output 'y'): the
    directory holding mlp_fake_quant_model.onnx, mlp_deploy_model.onnx and mlp_record.txt. Read-only."""
    from amct_core import save_distill_model
    from tests import models

    d = session_dir / "mlp-export"
    d.mkdir(parents=True, exist_ok=True)
    qat = models.make_qat("mlp", d)
    save_distill_model(qat, str(d / "mlp"), models.example_inputs("mlp", 1), record_file=str(d / "mlp_record.txt"),
                       input_names=["x"], output_names=["y"])
    return d


@pytest.fixture(scope="session")
def logged_export(prefect_api, mlflow_server, cnn_checkpoint, session_dir):
    """One flow run of the SmallCNN checkpoint logged to the session's `mlflow server` (experiment
    flow-mlflow-test), registered as version 1 of `cnn-int8`: (the flow's summary, its output directory)."""
    from flows.distill_export import distill_export

    out = session_dir / "logged-export"
    state = distill_export(**cnn_checkpoint.params(out, mlflow_tracking_uri=mlflow_server.url,
                                                   mlflow_experiment="flow-mlflow-test",
                                                   registered_model_name="cnn-int8"), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), out
