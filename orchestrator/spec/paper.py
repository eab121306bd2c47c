"""The paper's own numbers (``orchestrator/spec/reference/*.csv``, transcribed from Hasegawa & Sato,
2023): which tables a spec may name as its ``paper_table``, and the rows the report prints beside ours
and the claims test against.

Loading a spec needs only :func:`paper_tables` (the csv module); pandas is imported by
:func:`paper_reference` alone, so reading a spec works where pandas is not installed
(bench/gpu_paper_rows.py on a GPU machine)."""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def _reference_text(name: str) -> str:
    return (resources.files("orchestrator.spec") / "reference" / name).read_text()


def paper_reference(name: str = "paper_accuracy_tables.csv") -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(io.StringIO(_reference_text(name)))


def paper_tables() -> dict[str, list[int]]:
    """Per layout, the paper's tables whose numbers the report prints beside ours: a spec's
    ``paper_table`` must be one of its layout's (any other shows no paper rows)."""
    rows = csv.DictReader(io.StringIO(_reference_text("paper_accuracy_tables.csv")))
    accuracy = sorted({int(row["table"]) for row in rows})
    return {"accuracy": accuracy, "fdr": [2], "fdr_random_layer": [3], "figure": []}
