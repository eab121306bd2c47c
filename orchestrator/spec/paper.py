"""The paper's own numbers (``orchestrator/spec/reference/*.csv``, transcribed from Hasegawa & Sato,
2023): which tables a spec may name as its ``paper_table``, and the rows the report prints beside ours
and the claims test against."""

from __future__ import annotations

import io
from importlib import resources

import pandas as pd


def paper_reference(name: str = "paper_accuracy_tables.csv") -> pd.DataFrame:
    path = resources.files("orchestrator.spec") / "reference" / name
    return pd.read_csv(io.StringIO(path.read_text()))


def paper_tables() -> dict[str, list[int]]:
    """Per layout, the paper's tables whose numbers the report prints beside ours: a spec's
    ``paper_table`` must be one of its layout's (any other shows no paper rows)."""
    accuracy = sorted({int(t) for t in paper_reference()["table"]})
    return {"accuracy": accuracy, "fdr": [2], "fdr_random_layer": [3], "figure": []}
