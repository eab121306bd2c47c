"""The stages' MLflow runs: a listener of the stage events (see docs/results.md, "MLflow layout").

* **A parent run per stage** (``tune/<method>``, ``repeat/<method>``), made when the stage's first
  model run needs it and ended with the stage (FINISHED, FAILED with the reason, or KILLED when the
  sweep stops first).
* **Reference runs**: a model a stage uses but did not train (the tune stage's own seed, repeated;
  a model another spec trained) gets a lightweight run under the stage's parent run, tagged
  ``wbsweep.reference_of=<the model's run id>``, with its params and final metrics copied, so
  that a repeat parent lists all its seeds and every spec's experiment lists all its models.
  Nothing is trained again and no file is copied.
* **Repeat summaries**: a repeat stage's parent run holds the mean and std over its seeds of every
  LA variant's accuracies (``mean.<la>.acc_avg``, ``std.<la>.acc_many``, ...) and of the FDR,
  computed from the Parquet rows, as the report does.
* **The chosen trial**: the tune trial whose config a stage chose is tagged ``wbsweep.chosen=true``;
  the stage's parent run gets ``best.<knob>`` params and ``best_objective``.

Every call goes through the sweep's outbox, as the trial callback's do: a tracking store that is
locked or unreachable for a while delays the logging, never the sweep.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from orchestrator.sweep.context import SweepContext
from orchestrator.sweep.events import StageEvents
from orchestrator.sweep.stages import Node, RepeatNode
from orchestrator.tracking.tracker import Tracker, final_metrics, flat_params
from trainables.config import config_hash
from trainables.trial import training_config

#: The per-seed numbers a repeat parent summarises, per LA variant.
ACC = ("acc_many", "acc_medium", "acc_few", "acc_avg")
FDR = ("fdr_train", "fdr_test")


class StageRuns(StageEvents):
    """The MLflow runs of the stages of one sweep (see the module docstring)."""

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx
        self.tracker: Tracker = ctx.tracker  # type: ignore[assignment]
        self.parents: dict[str, str] = {}  # stage key -> its parent run

    def parent_run(self, stage: Node) -> str:
        """The stage's MLflow parent run, created (or re-attached) when it first needs it."""
        if stage.key not in self.parents:
            exp = self.ctx.exp
            tags = {"wbsweep.stage": stage.kind, "wbsweep.method": stage.method, "wbsweep.preset": exp.preset}
            name = f"{stage.kind}/{stage.method}"
            if exp.variant is not None:  # one spec over several datasets/models: a parent run each
                tags["wbsweep.variant"] = str(exp.variant)
                name = f"{name} [{exp.variant}]"
            self.parents[stage.key] = self.tracker.run(name, tags)
        return self.parents[stage.key]

    def _end(self, stage: Node, status: str, reason: str) -> None:
        """End the stage's run, if it has one, through the outbox: the run may be made by a call
        deferred before this one (the store was unavailable)."""
        def end() -> None:
            if stage.key in self.parents:
                self.tracker.finish(self.parents[stage.key], status, reason)

        self.ctx.outbox(f"the end of the {stage.label} run", end)

    # --- the stage events ----------------------------------------------------------------------
    def on_stage_end(self, stage, failed):
        self._end(stage, "FINISHED" if failed is None else "FAILED", failed or "")

    def on_stage_stop(self, stage, status, reason):
        self._end(stage, status, reason)

    def on_choice(self, stage, best, objective, searched):
        cfg = training_config(best)
        hash_, seed = config_hash(cfg), int(cfg["seed"])
        tracker, records = self.tracker, self.ctx.records

        def tag() -> None:  # the chosen trial's run
            run_id = records.run_file(hash_, seed, "mlflow_run_id")
            if run_id:
                tracker.client.set_tag(run_id, "wbsweep.chosen", "true")

        self.ctx.outbox(f"the chosen trial of {stage.label}", tag)
        self.ctx.outbox(f"the choice of {stage.label}", lambda: tracker.log_params(
            self.parent_run(stage), {f"best.{k}": v for k, v in searched.items()}))
        self.ctx.outbox(f"the choice of {stage.label}", lambda: tracker.log_metrics(
            self.parent_run(stage), {"best_objective": objective}))

    def on_model_reused(self, stage, trial_config, metrics, source):
        seed = int(training_config(trial_config)["seed"])
        self.ctx.outbox(f"the reference run of {stage.label} seed {seed}",
                        lambda: self.make_reference_run(stage, trial_config, metrics, source))

    # --- reference runs ------------------------------------------------------------------------
    def make_reference_run(self, stage: Node, trial_config: dict[str, Any], metrics: dict[str, Any],
                           source: str | None) -> None:
        """A run under ``stage``'s parent run for a model it reuses (trained by another stage or spec,
        whose run is ``source``): params and final metrics copied, ``wbsweep.reference_of`` the source
        run. None when the model's own run is already under this parent."""
        cfg = training_config(trial_config)
        hash_, seed = config_hash(cfg), int(cfg["seed"])
        tracker = self.tracker
        parent = self.parent_run(stage)
        if source:
            try:
                if tracker.client.get_run(source).data.tags.get("mlflow.parentRunId") == parent:
                    return  # the model's own run is under this stage already
            except Exception:  # noqa: BLE001 - a run deleted by hand, another store: the reference stays useful
                pass
        tags = {"wbsweep.kind": "reference", "wbsweep.model": f"{hash_}/seed{seed}", "wbsweep.ref_parent": parent}
        run_id = tracker.run(f"{stage.method} seed{seed} (reused)", tags, parent=parent)
        client = tracker.client
        client.set_tag(run_id, "wbsweep.reference_of", source or "")
        client.set_tag(run_id, "wbsweep.ref_config_hash", hash_)
        client.set_tag(run_id, "wbsweep.seed", str(seed))
        client.set_tag(run_id, "wbsweep.method", stage.method)
        client.set_tag(run_id, "wbsweep.stage", stage.kind)
        client.set_tag(run_id, "mlflow.note.content",
                       f"Reference to the run {source} that trained this model (not trained again)."
                       if source else "A model trained earlier without an MLflow run (not trained again).")
        tracker.log_params(run_id, flat_params(cfg))
        tracker.log_metrics(run_id, final_metrics(metrics), step=int(metrics.get("epochs", 0)))
        tracker.finish(run_id)

    # --- repeat summaries ----------------------------------------------------------------------
    def log_summaries(self, repeats: list[RepeatNode]) -> None:
        """Each finished repeat stage's parent run gets :func:`repeat_summary` of its rows."""
        for node in repeats:
            if node.state == "done":
                self.ctx.outbox(f"the summary of {node.label}", lambda node=node: self._summary(node))

    def _summary(self, node: RepeatNode) -> None:
        seeds = self.ctx.exp.seeds
        summary = repeat_summary(self.ctx.records.rows(node.method, {node.model_hash(s) for s in seeds}, seeds))
        if not summary:
            return
        attached = node.key not in self.parents  # re-attached now: it was ended by an earlier run
        run_id = self.parent_run(node)
        self.tracker.log_metrics(run_id, summary)
        self.chosen_params(run_id, node)
        if attached:
            self.tracker.finish(run_id)

    def chosen_params(self, run_id: str, node: RepeatNode) -> None:
        """The repeat parent run ``run_id`` gets the config its seeds share as params (the training
        config as a model run has it, but what differs between seeds: the seed, a second stage's
        ``init_from``) and ``config_hashes`` (seed:hash, ...): the table row's config, where the UI shows
        a run's params. MLflow's params cannot change: when the parent already holds another config's
        (the search chose again), they are left and the tag ``wbsweep.params_of`` says which config
        hash they describe."""
        tracker, seeds = self.tracker, self.ctx.exp.seeds
        cfgs = {s: training_config(self.ctx.trial_config(node.cfg, s)) for s in seeds}
        first = cfgs[seeds[0]]
        per_seed = [flat_params(c) for c in cfgs.values()]
        params = {k: v for k, v in per_seed[0].items() if all(p.get(k) == v for p in per_seed)}  # not seed, init_from
        params["config_hashes"] = ", ".join(f"{s}:{config_hash(c)}" for s, c in cfgs.items())
        held = tracker.client.get_run(run_id).data.params
        if any(held.get(k, str(v)[:6000]) != str(v)[:6000] for k, v in params.items()):
            return
        tracker.log_params(run_id, params)
        tracker.client.set_tag(run_id, "wbsweep.params_of", config_hash(first))


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


def end_reference_runs(tracker: Tracker) -> None:
    """End FINISHED the reference runs a driver that died left RUNNING (cut off while being made)."""
    flt = "attributes.status = 'RUNNING' and tags.`wbsweep.kind` = 'reference'"
    for r in tracker.client.search_runs([tracker.experiment_id], filter_string=flt, max_results=5000):
        tracker.finish(r.info.run_id)
