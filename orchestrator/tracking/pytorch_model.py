"""A trained model as an MLflow PyTorch model (``mlflow.pytorch.load_model("runs:/<run id>/pytorch_model")``).

The network is rebuilt from its run folder's ``model.pt`` alone (weights, config and the model's
spec: :func:`trainables.run_files.network_from_run`), so the driver loads no dataset.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from pathlib import Path

from orchestrator.tracking.tracker import Tracker, first_line
from trainables.run_files import network_from_run

#: Where a repeat-stage model run holds its MLflow PyTorch model.
PYTORCH_MODEL = "pytorch_model"


def log_pytorch_model(tracker: Tracker, run_id: str, folder: Path) -> str | None:
    """The model of ``folder`` as an MLflow PyTorch model under the run's ``pytorch_model`` (the
    requirements given, not inferred: cheap). Loading it needs wbsweep importable (its classes).
    A model that cannot be rebuilt or saved is not logged: the reason is returned (the sweep goes
    on); the store's own errors are raised (the outbox retries them)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PYTORCH_MODEL
        quiet = logging.getLogger("mlflow.pytorch")  # its warning about pickle, for every model
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            import mlflow.pytorch

            model = network_from_run(folder)
            kw = {}
            if "serialization_format" in inspect.signature(mlflow.pytorch.save_model).parameters:
                kw["serialization_format"] = "pickle"  # a newer MLflow's default (pt2) traces the model: not cheap
            mlflow.pytorch.save_model(model, str(path), pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                      **kw)
        except Exception as exc:  # noqa: BLE001 - the model's files and rows stand without it
            return first_line(exc)
        finally:
            quiet.setLevel(level)
        tracker.client.log_artifacts(run_id, str(path), artifact_path=PYTORCH_MODEL)
    return None
