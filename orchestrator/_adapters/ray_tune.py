"""Ray Tune internals and version-sensitive behaviour: ASHA's per-trial bookkeeping and the Optuna trials
of Ray's ``OptunaSearch``.

Checked against ray 2.41.0 and 2.60.0: ``AsyncHyperBandScheduler.on_trial_add`` /
``on_trial_complete`` / ``on_trial_remove``, and ``OptunaSearch.__init__`` / ``suggest`` /
``on_trial_complete`` read the same in both (``ASHAScheduler`` is ``AsyncHyperBandScheduler``).

The one private attribute read here, and nowhere else: ``OptunaSearch._ot_trials``
(:func:`optuna_trial_of`; Ray has no public way). ASHA's bookkeeping is kept through its public API
(:func:`asha_complete`, :func:`asha_remove`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

RAY_CHECKED = "ray 2.41.0 - 2.60.0"
_warned: set[str] = set()


def ray_version() -> str:
    try:
        from importlib.metadata import version

        return version("ray")
    except Exception:  # not installed as a distribution (a source tree)
        return "unknown"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s (ray %s; checked against %s)", message, ray_version(), RAY_CHECKED)


def _tolerate_unknown(call, trial) -> bool:
    """Run ``call()``; False when ASHA raised ``KeyError(trial_id)``: it does not know ``trial``."""
    try:
        call()
    except KeyError as exc:
        if exc.args != (trial.trial_id,):
            raise  # some other key: not ours to hide
        return False
    return True


# --- ASHA ------------------------------------------------------------------------------------------------


def asha_complete(asha: Any, controller: Any, trial: Any, result: dict) -> None:
    """Tell ``asha`` (an ``ASHAScheduler``) that ``trial`` ended with ``result``, and make it forget the trial.

    Public API only (``TrialScheduler.on_trial_complete`` and ``on_trial_remove``): no ``_trial_info``.
    Calling ``asha.on_trial_complete`` alone is not enough, and not safe:

    - a ``result`` without ASHA's ``time_attr`` or ``metric`` (a final report made of ``final/...``
      keys) is ignored and the trial stays in ASHA's bookkeeping for good: ``on_trial_remove`` drops it;
    - for a trial ASHA does not know (never added, or already completed or removed) both methods raise
      ``KeyError(trial_id)`` before they change anything: that error is swallowed here, any other raised.
    """
    if _tolerate_unknown(lambda: asha.on_trial_complete(controller, trial, result), trial):
        asha_remove(asha, controller, trial)  # a no-op when on_trial_complete already dropped it


def asha_remove(asha: Any, controller: Any, trial: Any) -> None:
    """Make ``asha`` forget ``trial`` (removed before it completed); nothing if it does not know it.

    Public API only: ``asha.on_trial_remove``, whose ``KeyError(trial_id)`` for a trial it does not
    know is swallowed (see :func:`asha_complete`).
    """
    _tolerate_unknown(lambda: asha.on_trial_remove(controller, trial), trial)


# --- OptunaSearch ----------------------------------------------------------------------------------------


def optuna_trial_of(search: Any, tune_trial_id: str) -> optuna.Trial | None:
    """The live ``optuna.Trial`` that Ray's ``OptunaSearch`` ``search`` asked its study for, for Tune
    trial ``tune_trial_id``; None when it has none (never suggested, or ``search`` is None).

    PRIVATE: ``OptunaSearch._ot_trials`` (Tune trial id -> ``optuna.Trial``), the one place wbsweep reads
    it. Ray has no public way: ``suggest`` returns only the parameters, ``on_trial_result`` reports only
    ``result[metric]`` at ``training_iteration``, and the study (``_ot_study``) is private as well. The
    trial it returns is used through Optuna's public ``Trial`` API (``report``, ``set_user_attr``).
    When a Ray release drops the attribute, this logs a warning (once) and returns None: the sweep goes on
    without the Optuna-side extras (user attributes, a pruned trial's intermediate value) rather than fail;
    ``tests/test_adapters.py`` fails loudly.
    """
    if search is None:
        return None
    trials = getattr(search, "_ot_trials", None)
    if not isinstance(trials, dict):
        _warn_once("_ot_trials", f"{type(search).__name__} has no _ot_trials dict: the Optuna trials of Tune "
                                 "trials are out of reach (update orchestrator/_adapters/ray_tune.py)")
        return None
    return trials.get(tune_trial_id)


def end_pruned(search: Any, tune_trial_id: str) -> None:
    """End the Optuna trial of Tune trial ``tune_trial_id`` PRUNED through Ray's ``OptunaSearch`` ``search``
    (which then counts it as completed). Optuna records the trial's last reported intermediate value, if
    any, as a pruned trial's value.

    Public API (``Searcher.on_trial_complete``), version-sensitive behaviour: ``OptunaSearch`` ends a
    trial PRUNED exactly when it completes with no value and no error (``result=None, error=False``);
    a value gives COMPLETE, ``error=True`` FAIL. ``tests/test_adapters.py`` checks the state it ends in.
    """
    search.on_trial_complete(tune_trial_id, result=None, error=False)
