"""What produced a result: the code (git commit and whether the work tree was dirty, or the
installed version outside a git checkout) and the versions of the packages the science depends on.

Every Parquet row carries them (``wbsweep_version``, ``git_commit``, ``git_dirty``, ``packages``;
docs/results.md) and :func:`mlflow_tags` gives MLflow's standard source tags
(``mlflow.source.git.commit``, ``mlflow.source.name``, ``mlflow.source.type``; MLflow's
"System tags" reference, https://mlflow.org/docs/latest/tracking/tracking-api#system-tags).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

#: The installed distributions recorded in each row (those that change numbers or files).
PACKAGES = ("torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow", "pandas", "numpy", "scipy",
            "scikit-learn", "matplotlib", "pyyaml")
#: The source tree of this wbsweep: the folder that holds ``orchestrator/``.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git_state(root: str | Path) -> tuple[str, bool] | None:
    """(``git rev-parse HEAD``, dirty) of the git work tree whose top folder is ``root``; None when
    ``root`` is not the top of a work tree (an installed copy under site-packages) or git is missing.

    Dirty means a tracked file differs from HEAD (staged or not); untracked files (a results folder
    inside the checkout) do not count."""
    root = Path(root)
    if not (root / ".git").exists():  # a folder inside someone else's repository is not ours
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return head.stdout.strip(), bool(status.stdout.strip())


def installed_version() -> str:
    try:
        return metadata.version("wbsweep")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def package_versions() -> dict[str, str]:
    """The installed version of each of :data:`PACKAGES` (absent ones left out) and Python's."""
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def code_version(root: str | Path | None = None) -> dict[str, Any]:
    """``wbsweep`` (the installed version, with ``+g<commit 12>`` and ``.dirty`` in a git checkout, in
    PEP 440's local-version form), ``git_commit`` and ``git_dirty`` (None outside a checkout)."""
    own = installed_version()
    state = git_state(root if root is not None else SOURCE_ROOT)
    if state is None:
        return {"wbsweep": own, "git_commit": None, "git_dirty": None}
    commit, dirty = state
    base = own.split("+")[0]
    return {"wbsweep": f"{base}+g{commit[:12]}{'.dirty' if dirty else ''}", "git_commit": commit, "git_dirty": dirty}


def versions(root: str | Path | None = None) -> dict[str, Any]:
    """What the results rows record (:func:`orchestrator.record.results.rows_for_run`): the code
    (:func:`code_version`), ``torch`` and ``ray`` (their own columns) and ``packages`` (every
    version of :func:`package_versions`, as JSON)."""
    pk = package_versions()
    return {**code_version(root), "torch": pk.get("torch", "unknown"), "ray": pk.get("ray", "unknown"),
            "packages": json.dumps(pk, sort_keys=True)}


@lru_cache(maxsize=4)
def _cached_code(root: str) -> dict[str, Any]:
    return code_version(root)


def mlflow_tags(root: str | Path | None = None) -> dict[str, str]:
    """MLflow's standard source tags for a run this code creates: ``mlflow.source.type`` LOCAL,
    ``mlflow.source.name`` the command (``sys.argv[0]``), ``mlflow.source.git.commit`` in a git
    checkout; and ``wbsweep.version``."""
    code = _cached_code(str(root if root is not None else SOURCE_ROOT))
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": sys.argv[0] or "wbsweep",
            "wbsweep.version": code["wbsweep"]}
    if code["git_commit"]:
        tags["mlflow.source.git.commit"] = code["git_commit"]
    return tags
