"""What a trial reports to Ray Tune: one structure, written by :mod:`trainables.trial` and read by
the sweep (``orchestrator/sweep``: the graph, the callbacks, the scheduler).

Every report is a dict with ``objective`` (Ray Tune wants one metric in each report: the validation
accuracy so far, then the trial's final objective) and, depending on what it says:

=====================  =====================================================================
key                    meaning
=====================  =====================================================================
``epoch`` + metrics    one epoch of a single model (``train_loss``, ``val_acc``, ``lr``, ...;
                       at most one report a second, always at early stopping's rungs)
``models``             one epoch of a fused group: ``{"<i>": epoch row}`` per model position
``final``              the single model finished: every metric (:func:`final_report`), with
                       the per-epoch ``history``, the LA variants, FDR, ``ray_node_id``
``diverged``           the single model's loss became NaN: the reason (no final metrics)
``group``              a fused group ended: ``{"<i>": final}`` per model, or
                       ``{"<i>": {"diverged": reason}}`` for a model that diverged
``warnings``           warnings raised in the trial since its last report, one a line
=====================  =====================================================================

Ray Tune hands the callbacks the report as sent and the searcher a flattened copy (``final/...``,
``group/<i>/objective``): the readers below accept both.
"""

from __future__ import annotations

from typing import Any

FINAL, GROUP, DIVERGED, MODELS, WARNINGS = "final", "group", "diverged", "models", "warnings"


# --- writing (the trainable) ---------------------------------------------------------------------


def epoch_report(metrics: dict[str, Any]) -> dict[str, Any]:
    """One epoch of a single model (Tune's objective: its validation accuracy so far)."""
    return {**metrics, "objective": metrics["val_acc"]}


def group_epoch_report(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One epoch of a fused group: a row per model position (the objective: the best one's)."""
    return {"val_acc": max(r["val_acc"] for r in rows.values()), MODELS: {str(i): r for i, r in rows.items()}}


def final_report(final: dict[str, Any]) -> dict[str, Any]:
    """A single model finished (``final``: every metric, its ``objective`` included)."""
    return {"objective": final["objective"], FINAL: final}


def diverged_report(reason: str) -> dict[str, Any]:
    """A single model's loss became NaN: the trial ends with the reason (retrying would diverge again)."""
    return {"objective": float("nan"), DIVERGED: reason}


def group_report(finals: dict[int, dict[str, Any] | str]) -> dict[str, Any]:
    """A fused group ended: per model position its final metrics, or the reason it diverged (a str)."""
    group = {str(i): {DIVERGED: f} if isinstance(f, str) else f for i, f in finals.items()}
    objectives = [g["objective"] for g in group.values() if "objective" in g]
    return {"objective": max(objectives) if objectives else float("nan"), GROUP: group}


def with_warnings(report: dict[str, Any], warnings: str) -> dict[str, Any]:
    return {**report, WARNINGS: warnings} if warnings else report


# --- reading (the sweep) ---------------------------------------------------------------------------


def is_final(result: dict | None) -> bool:
    """Whether a single model's report is its final one (nested or flattened)."""
    return bool(result) and (FINAL in result or any(str(k).startswith(FINAL + "/") for k in result))


def model_outcomes(result: dict | None, k: int) -> list[tuple[dict[str, Any] | None, str | None]]:
    """(final metrics, None) or (None, why not) for each of the ``k`` models of a trial's last
    report (``k`` = 1: a single model's trial; else a fused group's, by position)."""
    result = result or {}
    if k == 1:
        final = result.get(FINAL)
        return [(final, None) if final is not None else (None, result.get(DIVERGED))]
    group = result.get(GROUP) or {}
    out: list[tuple[dict[str, Any] | None, str | None]] = []
    for i in range(k):
        final = group.get(str(i))
        if final is None:
            out.append((None, "the fused trial ended without this model's result"))
        elif DIVERGED in final:
            out.append((None, final[DIVERGED]))
        else:
            out.append((final, None))
    return out


def member_result(result: dict | None, i: int) -> dict[str, Any] | None:
    """What model ``i`` of a fused group's trial reported at its end, in a single trial's form
    (``objective`` and ``final``), or None when it did not finish (it diverged, the trial failed).
    Reads the nested result (callbacks) and the flattened one (``group/<i>/...``: the searcher)."""
    if not result:
        return None
    group = result.get(GROUP)
    if isinstance(group, dict):
        final = group.get(str(i))
        objective = None if not isinstance(final, dict) else final.get("objective")
    else:
        objective = result.get(f"{GROUP}/{i}/objective")
        final = True
    if objective is None or DIVERGED in (final if isinstance(final, dict) else {}):
        return None
    return {"objective": objective, FINAL: final}


def epoch_rows(result: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(model position, epoch row) of each model an epoch report covers (none for a final report)."""
    rows = [(0, result)] if "epoch" in result else []
    return rows + [(int(i), row) for i, row in (result.get(MODELS) or {}).items()]
