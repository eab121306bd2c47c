"""MLflow views built on the model runs (see docs/results.md, "MLflow layout").

* **Reference runs**: a model a stage uses but did not train (the tune stage's own seed, repeated;
  a model another spec trained) gets a lightweight run under the stage's parent run, tagged
  ``wbsweep.reference_of=<the model's run id>``, with its params and final metrics copied, so
  that a repeat parent lists all its seeds and every spec's experiment lists all its models.
  Nothing is trained again and no file is copied.
* **Repeat summaries**: a repeat stage's parent run holds the mean and std over its seeds of every
  LA variant's accuracies (``mean.<la>.acc_avg``, ``std.<la>.acc_many``, ...) and of the FDR,
  computed from the Parquet rows, as the report does.
* **The chosen trial**: the tune trial whose config a stage chose is tagged ``wbsweep.chosen=true``.
* **The spec-level run**: ``report <preset>`` (tag ``wbsweep.kind=report``), made at the end of
  ``wbsweep run`` and of ``wbsweep report``: the report's table (MLflow's table artifact
  ``report_table.json`` and ``report.csv``), its text, its figures and the claims file written by
  ``report --claims``. Re-attached, not duplicated, on a rerun.

Every call that runs during a sweep goes through the sweep's outbox, as the callbacks' do.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from orchestrator.tracking.tracker import Tracker, final_metrics, first_line, flat_params
from trainables.config import config_hash
from trainables.trial import training_config

if TYPE_CHECKING:
    from orchestrator.sweep.driver import Sweep
    from orchestrator.sweep.graph import Node, RepeatNode, TuneNode

#: The per-seed numbers a repeat parent summarises, per LA variant.
ACC = ("acc_many", "acc_medium", "acc_few", "acc_avg")
FDR = ("fdr_train", "fdr_test")


def reference_run(sweep: Sweep, node: Node, trial_config: dict[str, Any], metrics: dict[str, Any],
                  source: str | None) -> None:
    """:func:`make_reference_run` through the sweep's outbox."""
    seed = int(training_config(trial_config)["seed"])
    sweep.outbox(f"the reference run of {node.label} seed {seed}",
                 lambda: make_reference_run(sweep, node, trial_config, metrics, source))


def make_reference_run(sweep: Sweep, node: Node, trial_config: dict[str, Any], metrics: dict[str, Any],
                       source: str | None) -> None:
    """A run under ``node``'s parent run for a model it reuses (trained by another stage or spec,
    whose run is ``source``): params and final metrics copied, ``wbsweep.reference_of`` the source
    run. None when the model's own run is already under this parent."""
    cfg = training_config(trial_config)
    hash_, seed = config_hash(cfg), int(cfg["seed"])
    tracker = sweep.tracker
    parent = node.parent_run()
    if source:
        try:
            if tracker.client.get_run(source).data.tags.get("mlflow.parentRunId") == parent:
                return  # the model's own run is under this stage already
        except Exception:  # noqa: BLE001 - a run deleted by hand, another store: the reference stays useful
            pass
    tags = {"wbsweep.kind": "reference", "wbsweep.model": f"{hash_}/seed{seed}", "wbsweep.ref_parent": parent}
    run_id = tracker.run(f"{node.method} seed{seed} (reused)", tags, parent=parent)
    client = tracker.client
    client.set_tag(run_id, "wbsweep.reference_of", source or "")
    client.set_tag(run_id, "wbsweep.ref_config_hash", hash_)
    client.set_tag(run_id, "wbsweep.seed", str(seed))
    client.set_tag(run_id, "wbsweep.method", node.method)
    client.set_tag(run_id, "wbsweep.stage", node.kind)
    client.set_tag(run_id, "mlflow.note.content",
                   f"Reference to the run {source} that trained this model (not trained again)."
                   if source else "A model trained earlier without an MLflow run (not trained again).")
    tracker.log_params(run_id, flat_params(cfg))
    tracker.log_metrics(run_id, final_metrics(metrics), step=int(metrics.get("epochs", 0)))
    tracker.finish(run_id)


def end_reference_runs(tracker: Tracker) -> None:
    """End FINISHED the reference runs a driver that died left RUNNING (cut off while being made)."""
    flt = "attributes.status = 'RUNNING' and tags.`wbsweep.kind` = 'reference'"
    for r in tracker.client.search_runs([tracker.experiment_id], filter_string=flt, max_results=5000):
        tracker.finish(r.info.run_id)


def stage_rows(sweep: Sweep, node: RepeatNode) -> pd.DataFrame:
    """The Parquet rows of the models of ``node`` (its chosen config, every seed of the preset)."""
    from orchestrator.record.results import read_rows

    df = read_rows(sweep.location("results"))
    if df.empty or not hasattr(node, "cfg"):
        return df[:0]
    hashes = {config_hash(training_config(sweep.trial_config(node.cfg, s))) for s in sweep.exp.seeds}
    exp = sweep.exp
    return df[(df["spec"] == exp.name) & (df["preset"] == exp.preset) & (df["method"] == node.method)
              & df["config_hash"].isin(hashes) & df["seed"].isin(exp.seeds)]


def repeat_summary(rows: pd.DataFrame) -> dict[str, float]:
    """mean.<la>.<acc> and std.<la>.<acc> for every LA variant, mean./std. of the FDR, and ``seeds``
    (sample std, as the report: NaN, so not logged, for one seed)."""
    out: dict[str, float] = {}
    if rows.empty:
        return out
    for la, g in rows.groupby("la"):
        for k in ACC:
            out[f"mean.{la}.{k}"] = float(g[k].mean())
            out[f"std.{la}.{k}"] = float(g[k].std())
    per_model = rows.drop_duplicates(["config_hash", "seed"])
    for k in FDR:
        out[f"mean.{k}"] = float(per_model[k].mean())
        out[f"std.{k}"] = float(per_model[k].std())
    out["seeds"] = float(per_model["seed"].nunique())
    return out


def chosen_params(tracker: Tracker, run_id: str, sweep: Sweep, node: RepeatNode) -> None:
    """The repeat parent run ``run_id`` gets the config its seeds share as params (the training
    config as a model run has it, but what differs between seeds: the seed, a second stage's
    ``init_from``) and ``config_hashes`` (seed:hash, ...): the table row's config, where the UI shows a
    run's params. MLflow's params cannot change: when the parent already holds another config's (the
    search chose again), they are left and the tag ``wbsweep.params_of`` says which config hash they
    describe."""
    cfgs = {s: training_config(sweep.trial_config(node.cfg, s)) for s in sweep.exp.seeds}
    first = cfgs[sweep.exp.seeds[0]]
    per_seed = [flat_params(c) for c in cfgs.values()]
    params = {k: v for k, v in per_seed[0].items() if all(p.get(k) == v for p in per_seed)}  # not seed, init_from
    params["config_hashes"] = ", ".join(f"{s}:{config_hash(c)}" for s, c in cfgs.items())
    held = tracker.client.get_run(run_id).data.params
    if any(held.get(k, str(v)[:6000]) != str(v)[:6000] for k, v in params.items()):
        return
    tracker.log_params(run_id, params)
    tracker.client.set_tag(run_id, "wbsweep.params_of", config_hash(first))


def log_repeat_summaries(sweep: Sweep) -> None:
    """Each finished repeat stage's parent run gets :func:`repeat_summary` of its rows."""
    tracker = sweep.tracker
    for node in sweep.repeat_nodes.values():
        if node.state != "done":
            continue

        def log(node: RepeatNode = node) -> None:
            summary = repeat_summary(stage_rows(sweep, node))
            if not summary:
                return
            attached = node._parent_run is None  # re-attached now: it was ended by an earlier run
            run_id = node.parent_run()
            tracker.log_metrics(run_id, summary)
            chosen_params(tracker, run_id, sweep, node)
            if attached:
                tracker.finish(run_id)

        sweep.outbox(f"the summary of {node.label}", log)


def mark_chosen(sweep: Sweep, node: TuneNode, best: dict[str, Any]) -> None:
    """Tag the MLflow run of the tune trial ``node`` chose: ``wbsweep.chosen=true``."""
    cfg = training_config(best)
    hash_, seed = config_hash(cfg), int(cfg["seed"])

    def tag() -> None:
        run_id = sweep.run_file(hash_, seed, "mlflow_run_id")
        if run_id:
            sweep.tracker.client.set_tag(run_id, "wbsweep.chosen", "true")

    sweep.outbox(f"the chosen trial of {node.label}", tag)


def optuna_attrs(node: Node, mid: str, attrs: dict[str, str]) -> None:
    """Set user attributes (``config_hash``, ``mlflow_run_id``) on the Optuna trial of tune trial
    ``mid``, while the study's searcher still holds it (``optuna-dashboard`` shows them). A trial
    that has finished cannot be changed (Optuna refuses): a run made only after its trial ended (its
    creation was deferred while the tracking store was locked) has no ``mlflow_run_id`` attribute;
    its ``config_hash`` (set when the trial starts) and the run's tags still link the two."""
    from optuna.exceptions import UpdateFinishedTrialError

    search = getattr(node, "optuna", None)
    trial = getattr(search, "_ot_trials", {}).get(mid) if search is not None else None
    if trial is None:
        return
    try:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
    except UpdateFinishedTrialError:
        pass


def log_report_run(tracking_uri: str, out: Path, store: str, spec: str, preset: str, text: str,
                   table_csv: str | None) -> str:
    """The spec-level run ``report <preset>`` of ``spec``'s experiment (made, or re-attached): the
    report's text and table, the figures ``out/figures/<spec>-<preset>-*.png`` and the claims of
    ``store/claims/<spec>-<preset>.csv``. Its id."""
    import tempfile

    from trainables import storage

    local = not tracking_uri.startswith(("http://", "https://"))
    tracker = Tracker(tracking_uri, spec, out / "mlartifacts" if local else None)
    client = tracker.client
    run_id = tracker.run(f"report {preset}", {"wbsweep.kind": "report", "wbsweep.preset": preset})
    try:
        _drop_artifacts(tracker, run_id, ["report_table.json", "claims_table.json"])  # log_table appends
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "report.txt").write_text(text)
            if table_csv:
                (folder / "report.csv").write_text(table_csv)
                client.log_table(run_id, data=pd.read_csv(io.StringIO(table_csv)), artifact_file="report_table.json")
            claims = storage.read_bytes(storage.join(store, "claims", f"{spec}-{preset}.csv"))
            if claims:
                (folder / "claims.csv").write_bytes(claims)
                client.log_table(run_id, data=pd.read_csv(io.BytesIO(claims)), artifact_file="claims_table.json")
            client.log_artifacts(run_id, str(folder))
        figures = sorted((out / "figures").glob(f"{spec}-{preset}-*.png"))
        for fig in figures:
            client.log_artifact(run_id, str(fig), artifact_path="figures")
        tracker.finish(run_id)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def attach_claims(tracking_uri: str, out: Path, spec: str, preset: str, claims: pd.DataFrame) -> str:
    """The claims of ``report --claims`` in the spec-level run ``report <preset>`` (made, or
    re-attached; the table replaced): ``claims_table.json`` and ``claims.csv``. Its id."""
    import tempfile

    local = not tracking_uri.startswith(("http://", "https://"))
    tracker = Tracker(tracking_uri, spec, out / "mlartifacts" if local else None)
    run_id = tracker.run(f"report {preset}", {"wbsweep.kind": "report", "wbsweep.preset": preset})
    try:
        _drop_artifacts(tracker, run_id, ["claims_table.json"])
        tracker.client.log_table(run_id, data=claims, artifact_file="claims_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "claims.csv").write_text(claims.to_csv(index=False))
            tracker.client.log_artifact(run_id, str(Path(tmp) / "claims.csv"))
        tracker.finish(run_id)
    except Exception:
        tracker.client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _drop_artifacts(tracker: Tracker, run_id: str, paths: list[str]) -> None:
    """Delete ``paths`` from a run's artifacts where the store allows it (so a rerun replaces them)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    have = {a.path for a in tracker.client.list_artifacts(run_id)}
    repo = get_artifact_repository(tracker.client.get_run(run_id).info.artifact_uri)
    for p in paths:
        if p in have:
            with contextlib.suppress(Exception):  # a store that cannot delete: the table is appended to
                repo.delete_artifacts(p)


def report_to_mlflow(tracking_uri: str | None, out: Path, store: str, spec: str, preset: str | None,
                     text: str, table_csv: str | None, log) -> None:
    """:func:`log_report_run` where there is a store; a failure is one line (the report stands)."""
    if not tracking_uri:
        return
    from orchestrator.record.results import read_rows
    from orchestrator.report.tables import select_rows
    from trainables import storage

    try:
        if preset is None:
            _, preset = select_rows(read_rows(storage.join(store, "results")), spec, None)
        run_id = log_report_run(tracking_uri, out, store, spec, preset, text, table_csv)
        log(f"report logged to MLflow ({tracking_uri}), run {run_id}")
    except Exception as exc:  # noqa: BLE001 - MLflow is a view: the report is printed regardless
        log(f"WARNING report not logged to MLflow: {first_line(exc)}")


def network_from_run(folder: Path):
    """The trained :class:`trainables.models.Network` of a run folder, rebuilt from its ``model.pt``
    (weights and config; the dataset, from this node's cache, gives the input shape and classes)."""
    import torch

    from trainables.config import DEFAULTS
    from trainables.datacache import cached_dataset
    from trainables.models import ModelSpec, build_model, fix_batchnorm_

    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    cfg = {**DEFAULTS, **state["config"]}
    root = cfg.get("data_root")
    if root is not None and not Path(root).is_dir():
        root = None  # trained elsewhere: this node's default data root
    data = cached_dataset(cfg["dataset"], root, cfg["rho"], val_per_class=cfg["val_per_class"], split=cfg["split"])
    model = build_model(ModelSpec(cfg["model"], data.num_classes, data.x_train.shape[1], data.x_val.shape[-1],
                                  cfg["classifier"], cfg["etf_bias"], cfg["width"], etf_seed=cfg["seed"]))
    if cfg["bn"] == "fixed":
        fix_batchnorm_(model, cfg["bn_scale"])
    model.load_state_dict(state["model"])
    return model.eval()


#: Where a repeat-stage model run holds its MLflow PyTorch model (``mlflow.pytorch.load_model(
#: "runs:/<run id>/pytorch_model")``).
PYTORCH_MODEL = "pytorch_model"


def log_pytorch_model(tracker: Tracker, run_id: str, folder: Path) -> str | None:
    """The model of ``folder`` as an MLflow PyTorch model under the run's ``pytorch_model`` (the
    requirements given, not inferred: cheap). Loading it needs wbsweep importable (its classes).
    A model that cannot be rebuilt or saved is not logged: the reason is returned (the sweep goes
    on); the store's own errors are raised (the outbox retries them)."""
    import inspect
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PYTORCH_MODEL
        quiet = logging.getLogger("mlflow.pytorch")  # its warning about pickle, for every model
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            import mlflow.pytorch

            model = network_from_run(folder)
            kw = {}
            if "serialization_format" in inspect.signature(mlflow.pytorch.save_model).parameters:
                kw["serialization_format"] = "pickle"  # a newer MLflow's default (pt2) traces the model: not cheap
            mlflow.pytorch.save_model(model, str(path), pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                      **kw)
        except Exception as exc:  # noqa: BLE001 - the model's files and rows stand without it
            return first_line(exc)
        finally:
            quiet.setLevel(level)
        tracker.client.log_artifacts(run_id, str(path), artifact_path=PYTORCH_MODEL)
    return None
