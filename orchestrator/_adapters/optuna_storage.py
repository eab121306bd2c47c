"""Optuna: ending a study's open trials through the storage interface.

Checked against optuna 4.0.0 and 5.1.0 (``BaseStorage.get_all_trials`` /
``get_trial_id_from_study_id_trial_number`` / ``set_trial_state_values`` and ``Study.tell``'s checks read
the same in both).
"""

from __future__ import annotations

from typing import Any

OPTUNA_CHECKED = "optuna 4.0.0 - 5.1.0"


def end_open_trials(storage: Any, study_id: int) -> int:
    """End FAIL the trials of study ``study_id`` in ``storage`` (an ``optuna.storages.BaseStorage``) left
    RUNNING (cut off) or WAITING (enqueued, never run). The number ended.

    Public API only: the storage interface (``get_all_trials``, ``get_trial_id_from_study_id_trial_number``,
    ``set_trial_state_values``), no longer ``FrozenTrial._trial_id``: a trial's storage id is looked up
    from the study id and its public ``number`` (one query per open trial; there are few).
    ``Study.tell(number, state=FAIL)`` is not a replacement: it refuses a WAITING trial ("Cannot tell a
    WAITING trial"), needs an ``optuna.load_study`` (with a sampler whose ``after_trial`` it runs) and
    ``optuna.storages.fail_stale_trials`` covers only RUNNING trials of a storage with heartbeats.
    A trial another process finished between the listing and the write is left as it is.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    ended = 0
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # finished meanwhile: no longer open
        ended += 1
    return ended
