"""orchestrator/_adapters: each adapter on the real library (no Ray cluster, no tracking server), and a guard
per private attribute or relied-upon behaviour whose failure names the adapter to update and the version."""

from __future__ import annotations

import logging
from importlib.metadata import version
from types import SimpleNamespace

import pytest

from orchestrator._adapters import mlflow_entities, optuna_storage, ray_tune

RAY, OPTUNA, MLFLOW = version("ray"), version("optuna"), version("mlflow")
UPDATE_RAY = f"(ray {RAY}; checked against {ray_tune.RAY_CHECKED}): update orchestrator/_adapters/ray_tune.py"
UPDATE_OPTUNA = (f"(optuna {OPTUNA}; checked against {optuna_storage.OPTUNA_CHECKED}): "
                 "update orchestrator/_adapters/optuna_storage.py")
UPDATE_MLFLOW = (f"(mlflow {MLFLOW}; checked against {mlflow_entities.MLFLOW_CHECKED}): "
                 "update orchestrator/_adapters/mlflow_entities.py")


# --- Ray Tune: ASHA ------------------------------------------------------------------------------------------


def _asha():
    """ASHA as orchestrator/spec/early_stopping.py makes it for a tune stage: rungs at epochs 1, 2, 4."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=7, grace_period=1,
                         reduction_factor=2, stop_last_trials=False)


def _trial(trial_id: str):
    """A real Ray Tune trial; a stub needs no Ray cluster and no registered trainable."""
    from ray.tune.experiment import Trial

    return Trial("wbsweep_adapter_test", config={}, trial_id=trial_id, stub=True)


def _knows(asha, trial) -> bool:
    """Whether ASHA still holds ``trial`` in its bookkeeping (the tests' only look at ASHA's internals)."""
    assert isinstance(getattr(asha, "_trial_info", None), dict), (
        f"ray.tune ASHAScheduler no longer has a _trial_info dict {UPDATE_RAY} (and this test's _knows)")
    return trial.trial_id in asha._trial_info


def test_asha_complete_records_the_result_and_forgets_the_trial():
    asha, (a, b) = _asha(), (_trial("a"), _trial("b"))
    asha.on_trial_add(None, a)
    ray_tune.asha_complete(asha, None, a, {"epoch": 1, "val_acc": 0.9})
    assert not _knows(asha, a)
    # a's result is in the first rung: a worse trial there is stopped
    asha.on_trial_add(None, b)
    assert asha.on_trial_result(None, b, {"epoch": 1, "val_acc": 0.1}) == asha.STOP
    ray_tune.asha_complete(asha, None, b, {"epoch": 1, "val_acc": 0.1})
    assert not _knows(asha, b)


def test_asha_complete_forgets_a_trial_whose_result_has_no_metric():
    """A final report (``final/...`` keys, no epoch or val_acc): ASHA's own on_trial_complete keeps the trial."""
    asha, a = _asha(), _trial("a")
    asha.on_trial_add(None, a)
    asha.on_trial_result(None, a, {"epoch": 1, "val_acc": 0.5})
    ray_tune.asha_complete(asha, None, a, {"final/avg": 0.5})
    assert not _knows(asha, a)


def test_asha_remove_drops_a_trial_and_nothing_else():
    asha, (a, b) = _asha(), (_trial("a"), _trial("b"))
    asha.on_trial_add(None, a)
    asha.on_trial_add(None, b)
    ray_tune.asha_remove(asha, None, a)
    assert not _knows(asha, a) and _knows(asha, b)


def test_asha_adapters_tolerate_a_trial_asha_does_not_know():
    asha, a = _asha(), _trial("a")
    ray_tune.asha_complete(asha, None, a, {"epoch": 1, "val_acc": 0.9})  # never added
    ray_tune.asha_remove(asha, None, a)
    asha.on_trial_add(None, a)
    ray_tune.asha_complete(asha, None, a, {"epoch": 1, "val_acc": 0.9})
    ray_tune.asha_complete(asha, None, a, {"epoch": 2, "val_acc": 0.9})  # again: already forgotten
    ray_tune.asha_remove(asha, None, a)
    assert not _knows(asha, a)


def test_asha_adapters_raise_other_key_errors(monkeypatch):
    asha, a = _asha(), _trial("a")
    asha.on_trial_add(None, a)

    def broken(controller, trial, result=None):
        raise KeyError("something else")

    monkeypatch.setattr(asha, "on_trial_complete", broken)
    monkeypatch.setattr(asha, "on_trial_remove", broken)
    with pytest.raises(KeyError, match="something else"):
        ray_tune.asha_complete(asha, None, a, {"epoch": 1, "val_acc": 0.9})
    with pytest.raises(KeyError, match="something else"):
        ray_tune.asha_remove(asha, None, a)


def test_guard_asha_raises_key_error_of_the_trial_for_an_unknown_trial():
    """What the ASHA adapters rely on: for a trial it does not know, ASHA raises KeyError(trial_id) (which
    they swallow) or nothing; any other error would reach the sweep."""
    asha, a = _asha(), _trial("a")
    for call in (lambda: asha.on_trial_complete(None, a, {"epoch": 1, "val_acc": 0.9}),
                 lambda: asha.on_trial_remove(None, a)):
        try:
            call()
        except KeyError as exc:
            assert exc.args == (a.trial_id,), f"ASHA's KeyError for an unknown trial is now {exc!r} {UPDATE_RAY}"
        except Exception as exc:  # pragma: no cover - the guard's failure
            pytest.fail(f"ASHA raises {exc!r} for an unknown trial, not KeyError(trial_id) {UPDATE_RAY}")


# --- Ray Tune: OptunaSearch ----------------------------------------------------------------------------------


@pytest.fixture
def search(tmp_path):
    """Ray's OptunaSearch as orchestrator/sweep/graph.py makes it: an RDB (SQLite) storage, a named study, a
    point to evaluate first. Its study, the same storage."""
    import optuna
    from optuna.distributions import FloatDistribution
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = OptunaSearch(space={"lr": FloatDistribution(1e-3, 1.0, log=True)}, metric="objective", mode="max",
                            sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True), storage=storage,
                            study_name="tune:ce", points_to_evaluate=[{"lr": 0.1}])
    yield searcher, storage
    storage.remove_session()
    storage.engine.dispose()


def _stored(storage, number: int):
    study_id = storage.get_study_id_from_name("tune:ce")
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))


def test_optuna_trial_of_is_the_live_trial_of_a_tune_trial(search):
    import optuna

    searcher, storage = search
    assert ray_tune.optuna_trial_of(searcher, "t1") is None  # not suggested yet
    params = searcher.suggest("t1")
    searcher.suggest("t2")
    trial = ray_tune.optuna_trial_of(searcher, "t1")
    assert isinstance(trial, optuna.Trial)
    assert trial.params == params == {"lr": 0.1} and trial.number == 0  # the enqueued point, the study's first
    assert ray_tune.optuna_trial_of(searcher, "t2").number == 1
    trial.set_user_attr("config_hash", "abc123")
    assert _stored(storage, 0).user_attrs == {"config_hash": "abc123"}
    assert ray_tune.optuna_trial_of(None, "t1") is None
    assert ray_tune.optuna_trial_of(searcher, "unknown") is None


def test_end_pruned_ends_the_trial_pruned_with_its_intermediate_value(search):
    from optuna.trial import TrialState

    searcher, storage = search
    searcher.suggest("t1")
    trial = ray_tune.optuna_trial_of(searcher, "t1")
    trial.report(0.42, 3)
    trial.set_user_attr("pruned_epoch", 3)
    ray_tune.end_pruned(searcher, "t1")
    stored = _stored(storage, trial.number)
    assert stored.state == TrialState.PRUNED, (
        f"OptunaSearch.on_trial_complete(result=None, error=False) now ends a trial {stored.state.name}, not "
        f"PRUNED {UPDATE_RAY}")
    assert stored.intermediate_values == {3: 0.42} and stored.value == 0.42
    assert stored.user_attrs == {"pruned_epoch": 3}


def test_end_pruned_without_a_reported_value(search):
    from optuna.trial import TrialState

    searcher, storage = search
    searcher.suggest("t1")
    ray_tune.end_pruned(searcher, "t1")
    stored = _stored(storage, 0)
    assert stored.state == TrialState.PRUNED and stored.value is None


def test_optuna_trial_of_warns_once_when_ray_no_longer_has_the_trials(caplog):
    ray_tune._warned.discard("_ot_trials")
    with caplog.at_level(logging.WARNING, logger=ray_tune.__name__):
        assert ray_tune.optuna_trial_of(SimpleNamespace(), "t1") is None
        assert ray_tune.optuna_trial_of(SimpleNamespace(), "t2") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "orchestrator/_adapters/ray_tune.py" in warnings[0] and f"ray {RAY}" in warnings[0]
    ray_tune._warned.discard("_ot_trials")


def test_guard_optuna_search_keeps_the_optuna_trials_in_ot_trials(search):
    import optuna

    searcher, _ = search
    assert isinstance(getattr(searcher, "_ot_trials", None), dict), (
        f"ray.tune OptunaSearch no longer has an _ot_trials dict {UPDATE_RAY}")
    searcher.suggest("t1")
    assert isinstance(searcher._ot_trials.get("t1"), optuna.Trial), (
        f"ray.tune OptunaSearch._ot_trials no longer maps a Tune trial id to its optuna.Trial {UPDATE_RAY}")


# --- Optuna ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["rdb", "inmemory"])
def storage(request, tmp_path):
    import optuna

    if request.param == "inmemory":
        yield optuna.storages.InMemoryStorage()
        return
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    yield rdb
    rdb.remove_session()
    rdb.engine.dispose()


def _states(storage, study_id: int) -> dict[int, str]:
    return {t.number: t.state.name for t in storage.get_all_trials(study_id, deepcopy=False)}


def test_end_open_trials_fails_running_and_waiting_trials_of_that_study_only(storage):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # another study first, so that the storage's trial ids are not the trial numbers of the study ended
    other = optuna.create_study(storage=storage, study_name="other")
    other.ask()
    other.ask()
    study = optuna.create_study(storage=storage, study_name="tune:ce", direction="maximize")
    done = study.ask()
    study.tell(done, 0.5)  # 0 COMPLETE
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)  # 1 PRUNED
    study.ask()  # 2 RUNNING: a driver cut off
    study.enqueue_trial({"x": 1.0})  # 3 WAITING: enqueued, never run
    study_id = storage.get_study_id_from_name("tune:ce")
    assert _states(storage, study_id) == {0: "COMPLETE", 1: "PRUNED", 2: "RUNNING", 3: "WAITING"}

    assert optuna_storage.end_open_trials(storage, study_id) == 2
    assert _states(storage, study_id) == {0: "COMPLETE", 1: "PRUNED", 2: "FAIL", 3: "FAIL"}
    assert _states(storage, storage.get_study_id_from_name("other")) == {0: "RUNNING", 1: "RUNNING"}
    assert optuna_storage.end_open_trials(storage, study_id) == 0
    # a resumed study does not run the enqueued point that was ended
    resumed = optuna.load_study(study_name="tune:ce", storage=storage)
    assert resumed.ask().number == 4


def test_end_open_trials_leaves_a_trial_finished_meanwhile(storage):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name="tune:ce")
    first, second = study.ask(), study.ask()
    study_id = storage.get_study_id_from_name("tune:ce")
    listed = storage.get_all_trials(study_id, deepcopy=True, states=(optuna.trial.TrialState.RUNNING,))
    study.tell(first, 1.0)  # another process ends it after the listing

    class Stale:  # the listing made before that
        def __getattr__(self, name):
            return getattr(storage, name)

        def get_all_trials(self, *args, **kwargs):
            return listed

    assert optuna_storage.end_open_trials(Stale(), study_id) == 1
    assert _states(storage, study_id) == {first.number: "COMPLETE", second.number: "FAIL"}


def test_guard_optuna_storage_interface():
    from optuna.storages import BaseStorage

    for name in ("get_all_trials", "get_trial_id_from_study_id_trial_number", "set_trial_state_values"):
        assert callable(getattr(BaseStorage, name, None)), f"optuna BaseStorage no longer has {name} {UPDATE_OPTUNA}"


# --- MLflow ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite tracking store for the module's tests (creating one takes seconds)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client, client.create_experiment("table4", artifact_location=(folder / "mlartifacts").as_uri())


@pytest.fixture
def client(mlflow_store):
    """The store's client and a new run of its experiment."""
    client, experiment = mlflow_store
    return client, client.create_run(experiment).info.run_id


MULTIPLE_WAYS = "ignore:The specified dataset source can be interpreted in multiple ways"  # a local path


def _sources(tmp_path):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    return {"data root": resolve_dataset_source(str(tmp_path)),
            "embedded": CodeDatasetSource({"wbsweep.dataset": "cifar10 (embedded in the package)"})}


@pytest.mark.filterwarnings(MULTIPLE_WAYS)
@pytest.mark.parametrize("kind", ["data root", "embedded"])
def test_dataset_input_logged_to_a_run_by_id(client, tmp_path, kind):
    import mlflow

    client, run_id = client
    source = _sources(tmp_path)[kind]
    name = f"cifar10 rho=100 split=paper val=20/class ({kind})"  # the experiment's datasets are one per name+digest
    assert mlflow.active_run() is None
    client.log_inputs(run_id, [mlflow_entities.dataset_input(source, name, "0123abcd")])
    client.log_inputs(run_id, [mlflow_entities.dataset_input(source, name, "0123abcd")])  # again: a no-op

    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1, f"logging a dataset input twice now keeps {len(inputs)} {UPDATE_MLFLOW}"
    logged = inputs[0]
    assert (logged.dataset.name, logged.dataset.digest) == (name, "0123abcd")
    assert logged.dataset.source_type == source._get_source_type()
    assert logged.dataset.source == source.to_json()
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training"}


@pytest.mark.filterwarnings(MULTIPLE_WAYS)
def test_dataset_input_without_context(tmp_path):
    assert mlflow_entities.dataset_input(_sources(tmp_path)["embedded"], "d", "1", context=None).tags == []


@pytest.mark.filterwarnings(MULTIPLE_WAYS)
def test_dataset_input_matches_mlflows_own_conversion(tmp_path):
    """The adapter builds what MLflow's private ``_to_mlflow_entity`` (the call site's former way) builds."""
    from mlflow.data.meta_dataset import MetaDataset

    source = _sources(tmp_path)["data root"]
    dataset = MetaDataset(source, name="d", digest="0123abcd")
    if not hasattr(dataset, "_to_mlflow_entity"):
        pytest.skip(f"mlflow {MLFLOW} has no Dataset._to_mlflow_entity to compare with")
    assert mlflow_entities.dataset_input(source, "d", "0123abcd").dataset == dataset._to_mlflow_entity()


def test_guard_mlflow_dataset_context_tag():
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    assert mlflow_entities.DATASET_CONTEXT_TAG == MLFLOW_DATASET_CONTEXT, (
        f"MLflow's dataset context tag is now {MLFLOW_DATASET_CONTEXT!r} {UPDATE_MLFLOW}")
