"""Early stopping of tune trials (ASHA) and the plan's cost estimate (issue #16)."""

from __future__ import annotations

import json
import textwrap
import time
from types import SimpleNamespace

import mlflow
import optuna
import pandas as pd
import pytest
from helpers import wbsweep
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchestrator.report import plan as cost
from orchestrator.spec import early_stopping as early_stop
from orchestrator.spec.experiment import load_experiment, load_experiments
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.scheduler import stage_scheduler
from orchestrator.sweep.stages import TuneNode
from trainables.errors import WbsweepError

PRUNE_SPEC = """
name: prunecheck
title: ASHA prunes hopeless trials
layout: accuracy
methods:
  - {method: wd, la: [none, mult]}
presets:
  smoke:
    train: {dataset: digits-lt, model: mlp3, width: 16, epochs: 3, batch_size: 64, lr: 0.05, checkpoint_seconds: 0}
    hyper: {wd: 5.0e-3}
    search:
      wd: {choice: [1.0e-4, 3.0, 5.0]}   # evaluated in this order; weight decay 3 and 5 learn nothing
    trials: 3
    seeds: [0, 1]
    search_scheduler: SCHEDULER
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_concurrent: 1}
"""


def write_spec(tmp_path, scheduler: str = "{name: asha, grace_period: 1, reduction_factor: 2}"):
    spec = tmp_path / "prune.yaml"
    spec.write_text(textwrap.dedent(PRUNE_SPEC).replace("SCHEDULER", scheduler))
    return spec


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start): exit status, stdout, stderr."""
    from orchestrator.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the spec and the rungs --------------------------------------------------------------------------


@pytest.mark.parametrize("value, words", [
    ("hyperband", "search_scheduler 'hyperband' is not one of none, asha"),
    ("{name: asha, grace_period: -1}", "grace_period must be a whole number of epochs >= 1, got -1"),
    ("{name: asha, reduction_factor: 1}", "reduction_factor must be a number above 1"),
    ("{name: asha, metric: train_loss}", "metric 'train_loss' is not one of val_acc"),
    ("{name: asha, grace: 3}", "unknown key(s) grace"),
])
def test_bad_search_scheduler_is_one_clear_line(tmp_path, value, words):
    with pytest.raises(WbsweepError, match=None) as err:
        load_experiment(str(write_spec(tmp_path, value)), "smoke")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_scheduler_settings_and_rungs(tmp_path):
    exp = load_experiment(str(write_spec(tmp_path)), "smoke")
    assert early_stop.early_stopping(exp)
    assert not early_stop.early_stopping(load_experiment(str(write_spec(tmp_path, "none")), "smoke"))
    assert not early_stop.early_stopping(load_experiment("table4", "paper"))
    # tuned stays a full search (ASHA changed the choice on digits-LT); tuned_asha is the opt-in
    assert not early_stop.early_stopping(load_experiment("table4", "tuned"))
    asha = load_experiment("table4", "tuned_asha")
    assert early_stop.early_stopping(asha) and early_stop.rungs(early_stop.settings(asha), 320) == [40, 120]
    assert early_stop.rungs(early_stop.settings(asha), 10) == [2, 6]  # WB's second stage
    defaults = early_stop.parse("asha", "x")
    assert early_stop.rungs(defaults, 40) == [5, 15]  # grace 40/8, reduction factor 3, none at the last epoch
    assert early_stop.rungs(defaults, 320) == [40, 120]
    assert early_stop.rungs({"grace_period": 1, "reduction_factor": 2}, 4) == [1, 2]  # not 4: the last epoch
    assert early_stop.rungs({"grace_period": 5, "reduction_factor": 3}, 5) == []  # no rung: never pruned
    # all trials to epoch 5, a third on to 15, a ninth to 40: 5 + 10/3 + 25/9
    assert early_stop.expected_epochs(defaults, 40) == pytest.approx(5 + 10 / 3 + 25 / 9)
    # asynchronous: the first trials at a rung always go on, so 8 trials train more than nominal
    assert early_stop.expected_epochs(defaults, 40) < early_stop.expected_epochs(defaults, 40, 8) < 40


def test_repeat_trials_always_continue_and_tune_trials_stop_below_the_cutoff():
    """The scheduler is Ray Tune's ASHA per tune stage; repeat-stage trials are never stopped."""
    sched = stage_scheduler(SimpleNamespace(search_scheduler=early_stop.parse(
        {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "x")))
    base = {"epochs": 4, "la": ["none"], "_runs": "/tmp/none"}

    def trial(tid, stage):
        return SimpleNamespace(trial_id=tid, config={**base, "seed": 0, "_stage": stage})

    good, bad, rep = trial("a", "tune:wd"), trial("b", "tune:wd"), trial("r", "repeat:wd")
    for t in (good, bad, rep):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"epoch": 1, "val_acc": 80.0}) == sched.CONTINUE
    assert sched.on_trial_result(None, bad, {"epoch": 1, "val_acc": 10.0}) == sched.STOP
    assert sched.on_trial_result(None, rep, {"epoch": 1, "val_acc": 0.0}) == sched.CONTINUE
    assert sched.on_trial_result(None, good, {"epoch": 3, "val_acc": 90.0}) == sched.CONTINUE  # past the last rung
    assert sched.pruned == {"b": 1}


# --- a resumed search keeps its pruned trials ----------------------------------------------------------


def test_pruned_trials_survive_a_resume_and_are_never_chosen(tmp_path):
    """A study an earlier run left with 2 finished trials, 2 pruned ones (the better intermediate
    values) and one cut off: the resumed stage counts 4 towards its budget of 6, proposes 2 more,
    and only the finished trials compete for the choice."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    dist = {"wd": FloatDistribution(1e-4, 1.0, log=True)}
    for wd, value in ((1e-3, 50.0), (2e-3, 60.0)):
        study.add_trial(create_trial(params={"wd": wd}, distributions=dist, value=value))
    for wd in (0.5, 0.9):
        study.add_trial(create_trial(params={"wd": wd}, distributions=dist, state=TrialState.PRUNED,
                                     intermediate_values={1: 99.0}))
    study.ask(dist)  # RUNNING when the driver died
    exp = SimpleNamespace(searched_for=lambda m: {"wd": {"loguniform": [1e-4, 1.0]}}, seeds=[0],
                          search_scheduler=early_stop.parse("asha", "x"))
    ctx = SimpleNamespace(exp=exp, optuna_storage=lambda: storage, progress=Progress(7, 2, quiet=True),
                          trial_config=lambda cfg, seed: {**cfg, "seed": seed, "_runs": str(tmp_path)})
    node = TuneNode(SimpleNamespace(ctx=ctx), SimpleNamespace(method=SimpleNamespace(name="wd")), 6)
    node.base, node.state = {"epochs": 40, "la": ["none"]}, "running"
    node.open_study("s")
    assert (node.issued, node.pruned, len(node.results)) == (4, 2, 2)
    assert ctx.progress.skipped == 4
    assert max(node.results, key=lambda r: r[0])[2]["wd"] == 2e-3  # never a pruned one
    proposed = [node.next_config(f"t{i}") for i in range(4)]
    assert [p is not None for p in proposed] == [True, True, False, False]
    assert proposed[0]["_report_epochs"] == [5, 15]  # the rungs are always reported
    states = [t.state for t in storage.get_all_trials(storage.get_study_id_from_name("s"))]
    assert states.count(TrialState.PRUNED) == 2 and states.count(TrialState.FAIL) == 1


# --- end to end through Ray Tune, Optuna, MLflow and Parquet --------------------------------------------


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory):
    """One real sweep whose search prunes its two hopeless points at the first rung, and the plan
    printed before it ran (estimated wall time on this machine)."""
    from orchestrator import cli as cli_module

    tmp = tmp_path_factory.mktemp("prune")
    spec, out = write_spec(tmp), tmp / "out"
    args = cli_module.build_parser().parse_args(["run", str(spec), "--preset", "smoke", "--plan", "--out", str(out),
                                                 "--device", "cpu"])
    lines: list[str] = []
    cost.print_plan(load_experiments(str(spec), "smoke"), lambda e: cost.measure_here(e, args.device), None, None,
                    log=lines.append)
    before = SimpleNamespace(stdout="\n".join(lines))
    t0 = time.time()
    proc = wbsweep("run", str(spec), "--preset", "smoke", "--out", str(out), "--device", "cpu", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return spec, out, before.stdout, time.time() - t0


# Ray start, 5 trials and the final table: about 40 s on 2 cores; shared by the three tests below.
@pytest.mark.slow
def test_a_pruned_trial_is_recorded_everywhere_and_never_chosen(pruned_sweep):
    _, out, _, _ = pruned_sweep
    trials = pd.read_parquet(out / "trials").drop_duplicates("config_hash")
    pruned = trials[trials["pruned"].fillna(False).astype(bool)]
    assert sorted(pruned["wd"]) == [3.0, 5.0] and set(pruned["epochs"]) == {1}
    assert pruned["objective"].isna().all() and pruned["acc_avg"].isna().all()
    chosen = json.loads(next((out / "stages").glob("tune-wd-*.json")).read_text())
    assert chosen["searched"] == {"wd": 1e-4}
    assert chosen["config"]["wd"] == 1e-4 and chosen["searched"]["wd"] not in set(pruned["wd"])
    results = pd.read_parquet(out / "results")
    assert sorted(set(results["seed"])) == [0, 1] and set(results["epochs"]) == {3}  # repeats run in full
    assert not results["pruned"].any()
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    (study,) = storage.get_all_studies()
    states = sorted(t.state.name for t in storage.get_all_trials(study._study_id))
    assert states == ["COMPLETE", "PRUNED", "PRUNED"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tagged = {r.data.tags.get("wbsweep.config_hash") for r in runs if r.data.tags.get("wbsweep.pruned") == "true"}
    assert tagged == set(pruned["config_hash"])
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_plan_subtracts_finished_models(pruned_sweep, capsys):
    spec, out, before, _ = pruned_sweep
    assert "3 model(s),   3 to train" in before and "2 model(s),   1 to train" in before
    code, stdout, stderr = cli(capsys, "run", str(spec), "--preset", "smoke", "--plan", "--out", str(out),
                               "--device", "cpu", "--price-per-gpu-hour", "3")
    assert code == 0, stderr
    assert "0 models to train" in stdout and "to train x" in stdout
    assert "3 model(s),   0 to train" in stdout and "2 model(s),   0 to train" in stdout
    assert "estimated cost at 3 per GPU-hour: 0.00" in stdout


@pytest.mark.slow
def test_the_plans_wall_time_is_within_a_factor_of_two_of_the_sweeps(pruned_sweep):
    _, _, before, measured = pruned_sweep
    line = next(ln for ln in before.splitlines() if "estimated wall time on this machine" in ln)
    value, unit = line.split("~")[1].split()[:2]
    estimate = float(value) * {"s": 1, "min": 60, "h": 3600}[unit]
    assert measured / 2 <= estimate <= measured * 2, (estimate, measured, before)


def test_the_plans_model_time_for_the_cpu_preset_is_within_a_factor_of_two_of_training_one():
    """The plan's per-model estimate for the cpu preset (measured for 6 epochs, extrapolated to 40)
    against one cpu-preset model of the measured kind (the first method, naive, with the three LA
    variants) trained here, as a trial does (one thread)."""
    import tempfile

    import torch

    from trainables.config import resolve_config
    from trainables.methods import get_method, method_config
    from trainables.train import train

    exp = load_experiment("table4", "cpu")
    cfg = resolve_config({**exp.train, **method_config(get_method("naive"), exp.hyper), "device": "cpu",
                          "seed": 1, "la": ["none", "add", "mult"], "compile": "off"})
    threads = torch.get_num_threads()
    estimates, times = [], []
    for _ in range(3):  # alternating, the median of each: sub-second figures on a shared machine
        cost._MEASURED.clear()  # a fresh measurement, not one an earlier test made under other load
        estimates.append(cost.measure_here(exp, "cpu").model_s(40) - cost.TRIAL_OVERHEAD_S)
        torch.set_num_threads(1)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                train(cfg, tmp)
                times.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
    estimate, measured = sorted(estimates)[1], sorted(times)[1]
    assert measured / 2 <= estimate <= measured * 2, (estimate, measured)


@pytest.mark.parametrize("args, words", [
    (("--price-per-gpu-hour", "-1"), "--price-per-gpu-hour must be a number >= 0"),
    (("--price-per-gpu-hour", "cheap"), "got 'cheap'"),
    (("--plan-device", "a100"), "no figures recorded for device 'a100'"),
])
def test_bad_plan_options_are_one_line(tmp_path, capsys, args, words):
    code, _, stderr = cli(capsys, "run", "table4", "--preset", "tuned", "--plan", "--out", str(tmp_path / "o"), *args)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in stderr, stderr


def test_an_unknown_search_scheduler_through_the_cli_is_one_line(tmp_path, capsys):
    code, _, stderr = cli(capsys, "run", str(write_spec(tmp_path, "hyperband")), "--preset", "smoke", "--plan")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "search_scheduler 'hyperband' is not one of none, asha" in lines[0]


def test_plan_from_recorded_gpu_figures_with_a_price():
    exp = load_experiment("table4", "tuned")
    speed = cost.recorded_speed(exp, "h200")
    assert speed.gpu and speed.epoch_s == pytest.approx(0.8889)  # resnet34, CIFAR100-LT-shaped, 10,457 images
    lines: list[str] = []
    costs = cost.print_plan([exp], lambda e: speed, None, 2.0, log=lines.append)
    tune = [c for c in costs if c.kind == "tune"]
    assert len(tune) == 4 and all(c.left == 16 and c.epochs in (320, 10) for c in tune)
    full = sum(c.seconds for c in costs) / 3600
    assert f"{full:.2f} GPU-hours without early stopping" in "\n".join(lines)
    assert sum(c.es_seconds for c in costs) < sum(c.seconds for c in costs)
    h100 = cost.recorded_speed(exp, "h100")  # resnet34 not recorded on the H100: scaled, and said so
    assert "scaled from resnet32" in h100.source
