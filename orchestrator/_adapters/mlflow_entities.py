"""MLflow: the entities ``MlflowClient`` takes, built from ``mlflow.data`` objects.

Checked against mlflow 3.9.0 and 3.18.0 (``MetaDataset.to_dict``, ``mlflow.entities.Dataset``,
``DatasetInput``, ``InputTag`` and ``MlflowClient.log_inputs`` read the same in both).
"""

from __future__ import annotations

from typing import Any

MLFLOW_CHECKED = "mlflow 3.9.0 - 3.18.0"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # the input tag mlflow.log_input(context=...) sets (its docstring)


def dataset_input(source: Any, name: str, digest: str, context: str | None = "training") -> Any:
    """The ``mlflow.entities.DatasetInput`` that ``MlflowClient.log_inputs(run_id, datasets=[...])`` takes
    for a metadata-only dataset: ``name``, ``digest`` and ``source`` (an ``mlflow.data`` ``DatasetSource``),
    with the input tag ``mlflow.data.context`` = ``context`` (none when ``context`` is None).

    Public API only, no longer ``Dataset._to_mlflow_entity()``: ``MetaDataset(...).to_dict()`` (documented:
    name, digest, source, source type and, when set, schema and profile, as strings) fills the public
    ``mlflow.entities.Dataset(name, digest, source_type, source, schema, profile)`` constructor, as the
    private method does. ``mlflow.log_input`` would do all this, but only for the active run; wbsweep logs
    to runs by id from the driver.
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    d = MetaDataset(source, name=name, digest=digest).to_dict()
    entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                     schema=d.get("schema"), profile=d.get("profile"))
    tags = [InputTag(DATASET_CONTEXT_TAG, context)] if context is not None else []
    return DatasetInput(entity, tags=tags)
