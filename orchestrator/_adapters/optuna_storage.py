"""(placeholder; replaced by the adapters branch)"""


def end_open_trials(storage, study_id: int) -> None:
    from optuna.trial import TrialState

    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
