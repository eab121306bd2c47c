"""(placeholder; replaced by the adapters branch)"""


def asha_knows(asha, trial_id: str) -> bool:
    return trial_id in asha._trial_info


def asha_forget(asha, trial_id: str) -> None:
    asha._trial_info.pop(trial_id, None)


def optuna_trial_of(search, trial_id: str):
    return getattr(search, "_ot_trials", {}).get(trial_id)
