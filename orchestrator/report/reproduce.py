"""``wbsweep train --config``: whether training a saved run again reproduced it. Reads the saved
run's ``config.json`` (:func:`saved_config`) and compares the new ``metrics.json`` with the saved
one (:func:`reproduction`): the numbers that must match (:data:`REPRODUCED`, each LA variant's),
by how much they differ, and why they may (a run trained fused with others).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainables.errors import WbsweepError


def reproduction(before: dict, after: dict) -> str:
    """Whether a re-run reproduced a saved run's metrics: "reproduced exactly", or which numbers
    differ, by how much, and why they may (a run trained fused with others, re-run alone, rounds
    differently)."""
    diff = metric_differences(before, after)
    if not diff:
        return "reproduced exactly"
    text = f"differ in {', '.join(diff[:8])}" + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
    rel = largest_relative_difference(before, after)
    if rel is not None:
        text += f" (largest relative difference {rel:.2g})"
    k, again = int(before.get("fused_k") or 1), int(after.get("fused_k") or 1)
    if k > 1 and again == 1:
        text += (f"; it was trained fused with {k - 1} other model(s) (trainables/fused.py) and now alone: the "
                 "batched arithmetic rounds differently, and in float32 the difference grows over the epochs "
                 "(docs/performance.md); without --alone it is trained fused again, which reproduces it")
    return text


#: The numbers of a model that a re-run must reproduce (not its timings or where it ran).
REPRODUCED = ("fdr_train", "fdr_test", "objective", "best_epoch", "epochs", "config_hash")


def metric_differences(before: dict, after: dict) -> list[str]:
    """The metrics (``REPRODUCED`` and every LA variant's numbers) that differ between two runs of one config."""
    diff = [k for k in REPRODUCED if before.get(k) != after.get(k)]
    for la, r in before.get("la", {}).items():
        other = after.get("la", {}).get(la, {})
        diff += [f"{la}.{k}" for k in ("param", "val_acc", "many", "medium", "few", "avg", "acc_per_class")
                 if r.get(k) != other.get(k)]
    return diff


def largest_relative_difference(before: dict, after: dict) -> float | None:
    """max |a − b| / max(|a|, |b|) over the numbers :func:`metric_differences` compares."""
    pairs = [(before.get(k), after.get(k)) for k in ("fdr_train", "fdr_test", "objective")]
    for la, r in before.get("la", {}).items():
        other = after.get("la", {}).get(la, {})
        pairs += [(r.get(k), other.get(k)) for k in ("param", "val_acc", "many", "medium", "few", "avg")]
        pairs += list(zip(r.get("acc_per_class") or [], other.get("acc_per_class") or [], strict=False))
    rel = [abs(a - b) / max(abs(a), abs(b)) for a, b in pairs
           if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a != b]
    return max(rel) if rel else None


def saved_config(path: str) -> tuple[Path, dict]:
    """(the config.json, its config) of a saved run: ``PATH/config.json`` or its folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise WbsweepError(f"--config {path}: no such file; give a run's config.json (DIR/runs/<hash>/seed<k>/"
                           "config.json) or its folder.")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WbsweepError(f"--config {p} is not readable JSON ({exc}); give a run's config.json.") from None
    if not isinstance(cfg, dict) or "dataset" not in cfg or "seed" not in cfg:
        raise WbsweepError(f"--config {p} is not a wbsweep run's config (a JSON object with dataset, seed, ...).")
    if cfg.get("init_from") and cfg.get("parent_hash"):
        # a second stage starts from its parent's model.pt, recorded as an absolute path: in a folder
        # moved or copied since, the parent beside this run (runs/<parent hash>/seed<k>) is that model
        beside = p.parent.parent.parent / str(cfg["parent_hash"]) / f"seed{cfg['seed']}" / "model.pt"
        if beside.is_file():
            cfg["init_from"] = str(beside)
    return p, cfg
