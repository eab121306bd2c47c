"""The stages of a sweep: ``tune`` (an Optuna search over a method's knobs, on validation) and
``repeat`` (the chosen config over every seed, on test), and when each is ready.

A stage (:class:`Node`) says when its inputs allow it to start, what its next trial config is, and
what it makes of a finished trial; the stage graph (:mod:`orchestrator.sweep.graph`) asks every stage
in turn and hands Ray Tune their trials. A stage tells what happened (started, ended, chose, reused a
model) to the sweep's :class:`~orchestrator.sweep.events.StageEvents`; it never logs to MLflow.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Protocol

from orchestrator._adapters.optuna_storage import end_open_trials
from orchestrator._adapters.ray_tune import end_pruned, optuna_trial_of
from orchestrator.spec import configs, early_stopping
from orchestrator.spec.experiment import MethodEntry
from orchestrator.spec.space import discrete_points, optuna_space, point_key
from orchestrator.sweep.context import SweepContext
from orchestrator.sweep.fusion import FusionSizes
from trainables.fused import fusion_key
from trainables.reports import is_final
from trainables.trial import training_config


class Graph(Protocol):
    """What a stage asks of the graph it belongs to (:class:`orchestrator.sweep.graph.StageGraph`)."""

    ctx: SweepContext
    sizes: FusionSizes | None
    chosen: dict[str, dict[str, Any]]  # method -> its chosen training config (without seed)

    def base_config(self, entry: MethodEntry) -> dict[str, Any] | str | None: ...

    def parent_model_state(self, entry: MethodEntry, seed: int) -> str: ...


class Node:
    """One stage. Subclasses say when it is ready and what its next trial config is."""

    kind = ""

    def __init__(self, graph: Graph, entry: MethodEntry, planned: int):
        self.graph, self.ctx, self.entry, self.planned = graph, graph.ctx, entry, planned
        self.method = entry.method.name
        self.key = f"{self.kind}:{self.method}"
        self.label = f"{self.kind} {self.method}"
        self.search: dict[str, Any] = {}  # the searched knobs (a tune stage's)
        self.state = "waiting"  # waiting -> running -> done | failed
        self.reason = ""
        self.in_flight: dict[str, dict[str, Any]] = {}  # trial id -> trial config
        self._fusion_key: tuple[str, ...] | None | bool = False  # False: not computed yet

    # -- shared ------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason
        self.ctx.events.on_stage_end(self, reason)

    def start(self) -> None:
        self.state = "running"
        self.ctx.events.on_stage_start(self)

    def finish(self) -> None:
        self.state = "done"
        self.ctx.events.on_stage_end(self, None)

    def stop(self, status: str, reason: str) -> None:
        """The sweep stops before this stage is done: it stays 'waiting' or 'running' for the status
        file (a resume continues it); the listeners end its run ``status`` (KILLED, FAILED)."""
        if self.state in ("waiting", "running"):
            self.ctx.events.on_stage_stop(self, status, reason)

    def trial(self, trial_id: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        config = {**self.ctx.trial_config(cfg, seed), "_stage": self.key}
        self.in_flight[trial_id] = config
        return config

    def fusion_key(self) -> tuple[str, ...] | None:
        """What this stage's models share with those they may be fused with (see
        :func:`trainables.fused.fusion_key`); None: they train alone. Only asked while running."""
        if self._fusion_key is False:
            fuses = self.graph.sizes is not None and self.graph.sizes.fuses and self.fusable()
            self._fusion_key = fusion_key(self.fusion_config(), tuple(self.search)) if fuses else None
        return self._fusion_key  # type: ignore[return-value]

    def fusable(self) -> bool:
        return True

    def fusion_config(self) -> dict[str, Any]:
        """A training config of this stage's models (what ``fuse: auto`` measures)."""
        raise NotImplementedError

    # -- per kind ------------------------------------------------------------------------------
    def step(self) -> None:
        """Move from waiting to running (or done/failed) when the inputs allow."""

    def next_config(self, trial_id: str) -> dict[str, Any] | None:
        return None

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        self.in_flight.pop(trial_id, None)


class TuneNode(Node):
    """Optuna searches the method's knobs on validation; the best trial's config is chosen."""

    kind = "tune"

    def __init__(self, graph: Graph, entry: MethodEntry, planned: int):
        super().__init__(graph, entry, planned)
        self.issued = 0
        self.results: list[tuple[float, int, dict[str, Any]]] = []  # (objective, Optuna trial number, config)
        self.search = self.ctx.exp.searched_for(entry.method)
        self.seed = self.ctx.exp.seeds[0]
        self.pruned = 0  # trials stopped early (early stopping), this run's and a resumed study's
        self.study_name: str | None = None

    def step(self) -> None:
        if self.state != "waiting":
            return
        base = self.graph.base_config(self.entry)
        if base is None:  # the parent's config is not chosen yet
            return
        if isinstance(base, str):
            return self.fail(base)
        parent_state = self.graph.parent_model_state(self.entry, self.seed)
        if parent_state == "failed":
            return self.fail(f"its first stage '{self.entry.method.parent}' failed for seed {self.seed}")
        if parent_state == "pending":
            return
        self.base = base
        # What the search is about (orchestrator/spec/configs.py tune_key): a rerun on another machine, or
        # by a newer version, finds the stage's choice again; the report finds it the same way.
        exp = self.ctx.exp
        key = configs.tune_key(exp, base, self.search, self.planned, self.seed, self.ctx.runs)
        self.record = configs.choice_record(self.ctx.out, self.method, key)
        searched = self.recorded_choice()
        if searched is not None:
            self.graph.chosen[self.method] = {**base, **searched}  # this run's device, threads, paths
            self.ctx.progress.skip(self.planned, "choice")
            self.finish()
            return
        self.open_study(f"{exp.name}-{self.method}-{key}")
        if self.issued >= self.planned:
            self.choose()
        else:
            self.start()

    def recorded_choice(self) -> dict[str, Any] | None:
        """The searched values this stage chose in an earlier run, or None. A torn or foreign record
        is set aside (renamed ``.bad``): the study in optuna.db has the trials, the choice is made again."""
        try:
            return configs.read_choice(self.record, self.search)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            bad = self.record.with_suffix(".bad")
            os.replace(self.record, bad)
            self.ctx.progress.note(f"{self.label}: unreadable record {self.record.name} ({exc}); moved to "
                                   f"{bad.name}, the choice is made again from the study")
            return None

    def open_study(self, name: str) -> None:
        """The Optuna study of this stage, persisted in DIR/optuna.db so that a resumed sweep
        continues it: its finished trials count towards the budget and compete for the choice,
        and trials left RUNNING by a killed driver are marked failed (Ray's own restore once lost
        OptunaSearch's state: ray-project/ray#30861, so the study is ours to keep)."""
        import optuna
        from optuna.trial import TrialState
        from ray.tune.search.optuna import OptunaSearch

        storage = self.ctx.optuna_storage()
        earlier, pruned, numbers = [], [], []
        if name in {s.study_name for s in storage.get_all_studies()}:
            study_id = storage.get_study_id_from_name(name)
            end_open_trials(storage, study_id)  # a driver killed before it could
            numbers = [t.number for t in storage.get_all_trials(study_id, deepcopy=False)]
            earlier = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
            # pruned trials count towards the budget (and are not proposed again) but are never chosen
            pruned = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.PRUNED,))
            self.pruned = len(pruned)
        # A discrete space (the BN-scale grid) is enumerated, each point once, also across a resume:
        # the points a finished trial evaluated are not proposed again.
        points = discrete_points(self.search, self.planned, self.seed)
        if points is not None:
            done = {point_key(t.params) for t in earlier + pruned}
            points = [p for p in points if point_key(p) not in done]
            planned = len(earlier) + len(pruned) + len(points)
            if planned < self.planned:  # a grid smaller than the budget: no point twice
                self.ctx.progress.total -= self.planned - planned
                self.planned = planned
        self.results = [(float(t.value), t.number, self.ctx.trial_config({**self.base, **t.params}, self.seed))
                        for t in earlier]
        self.issued = len(self.results) + self.pruned
        # the order the trials were proposed in: the study's trial numbers, then this run's proposals
        self.proposals = itertools.count(max(numbers, default=-1) + 1)
        self.proposed: dict[str, int] = {}
        if self.issued:
            self.ctx.progress.skip(self.issued, "study")
        # A new seed per resume, so the sampler does not propose the finished points again. constant_liar
        # explicitly (Optuna 5's default, not 4's): trials in flight count as bad, not as unexplored.
        sampler = optuna.samplers.TPESampler(seed=self.seed + len(earlier), constant_liar=True)
        self.study_name = name
        self.optuna = OptunaSearch(space=optuna_space(self.search), metric="objective", mode="max",
                                   sampler=sampler, storage=storage, study_name=name, points_to_evaluate=points)

    def set_trial_attrs(self, trial_id: str, attrs: dict[str, str]) -> None:
        """User attributes (``config_hash``, ``mlflow_run_id``) on the Optuna trial of tune trial
        ``trial_id``, while the search still holds it (``optuna-dashboard`` shows them). A trial that
        has finished cannot be changed (Optuna refuses): a run made only after its trial ended (its
        creation was deferred while the tracking store was locked) has no ``mlflow_run_id`` attribute;
        its ``config_hash`` (set when the trial starts) and the run's tags still link the two."""
        from optuna.exceptions import UpdateFinishedTrialError

        trial = optuna_trial_of(self.optuna, trial_id) if self.study_name else None
        if trial is None:
            return
        try:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
        except UpdateFinishedTrialError:
            pass

    def stop(self, status: str, reason: str) -> None:
        """Also the study's trials in flight (and points enqueued for it) end FAIL, as a resume would
        end them: they do not count towards the budget; the resumed search proposes others."""
        super().stop(status, reason)
        if self.study_name:
            storage = self.ctx.optuna_storage()
            end_open_trials(storage, storage.get_study_id_from_name(self.study_name))

    def fusable(self) -> bool:
        # early stopping stops a Ray trial as a whole: one model per trial
        return not early_stopping.early_stopping(self.ctx.exp)

    def fusion_config(self) -> dict[str, Any]:
        return self.base

    def next_config(self, trial_id: str) -> dict[str, Any] | None:
        if self.state != "running" or self.issued >= self.planned:
            return None
        params = self.optuna.suggest(trial_id)
        if params is None:
            return None
        self.issued += 1
        self.proposed[trial_id] = next(self.proposals)
        cfg = {**self.base, **params}
        return self.trial(trial_id, {**cfg, **early_stopping.report_epochs(self.ctx.exp, cfg)}, self.seed)

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        config = self.in_flight.pop(trial_id)
        number = self.proposed.pop(trial_id)
        epoch = self.ctx.pruned_epoch(trial_id)
        if epoch is not None and not error:  # stopped early: PRUNED, never chosen
            self.tell_pruned(trial_id, result, epoch)
            self.pruned += 1
        else:
            error = error or not is_final(result)  # a diverged trial reports no final metrics
            self.optuna.on_trial_complete(trial_id, result=None if error else result, error=error)
            if not error:
                self.results.append((float(result["objective"]), number, config))
        if self.issued >= self.planned and not self.in_flight:
            self.choose()

    def tell_pruned(self, trial_id: str, result: dict | None, epoch: int) -> None:
        """End the Optuna trial PRUNED, with the metric at ``epoch`` as its intermediate value
        (Optuna's own record of where a pruned trial stood)."""
        ot_trial = optuna_trial_of(self.optuna, trial_id)
        value = (result or {}).get("val_acc")
        if ot_trial is not None and value is not None:
            ot_trial.report(float(value), int(epoch))
            ot_trial.set_user_attr("pruned_epoch", int(epoch))
        end_pruned(self.optuna, trial_id)

    def choose(self) -> None:
        if not self.results:
            return self.fail("every trial failed")
        # the best objective; of equal ones (a coarse validation accuracy ties easily) the first trial
        # Optuna proposed, as Optuna's best_trial: never the one that happened to finish first
        objective, _, best = max(self.results, key=lambda r: (r[0], -r[1]))
        cfg = training_config(best)
        chosen = {k: cfg[k] for k in self.base} | {k: cfg[k] for k in self.search}
        self.graph.chosen[self.method] = chosen
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        searched = {k: chosen[k] for k in self.search}
        tmp.write_text(json.dumps({"config": chosen, "objective": objective, "searched": searched},
                                  indent=2, default=str))
        os.replace(tmp, self.record)
        self.ctx.events.on_choice(self, best, objective, searched)
        self.finish()


class RepeatNode(Node):
    """The chosen config over every seed; finished seeds are skipped, models trained earlier reused."""

    kind = "repeat"

    def __init__(self, graph: Graph, entry: MethodEntry, planned: int, tune: TuneNode | None):
        super().__init__(graph, entry, planned)
        self.tune = tune
        self.todo: list[int] = []
        self.finished_seeds: set[int] = set()  # seeds whose model is known to be finished
        self.failed_seeds: dict[int, str] = {}
        self.missing: set[int] = set()  # seeds with rows whose model's files are gone

    def step(self) -> None:
        if self.state == "waiting":
            if self.tune is not None:
                if self.tune.state == "failed":
                    return self.fail(f"its tune stage failed: {self.tune.reason}")
                if self.tune.state != "done":
                    return
                cfg = self.graph.chosen[self.method]
            else:
                cfg = self.graph.base_config(self.entry)
                if cfg is None:
                    return
                if isinstance(cfg, str):
                    return self.fail(cfg)
                self.graph.chosen[self.method] = cfg
            self.cfg = cfg
            self.todo = self.unfinished_seeds()
            self.start()
        if self.state == "running":
            for seed in list(self.todo):
                if self.graph.parent_model_state(self.entry, seed) == "failed":
                    self.todo.remove(seed)
                    self.failed_seeds[seed] = "its first-stage model failed"
                    self.ctx.progress.failed(f"{self.label} seed {seed}: its first-stage model failed")
            self._maybe_finish()

    def model_hash(self, seed: int) -> str:
        return configs.model_hash(self.cfg, seed, self.ctx.runs)

    def unfinished_seeds(self) -> list[int]:
        """Seeds still to train. Seeds with rows are skipped; models trained earlier (the tune
        stage's own seed, another spec's identical run) only get their rows written."""
        records, progress = self.ctx.records, self.ctx.progress
        todo = []
        for seed in self.ctx.exp.seeds:
            h = self.model_hash(seed)
            if records.has_rows(self.method, h, seed):
                progress.skip(1, "rows")
                continue
            metrics = records.finished(h, seed)
            if metrics is not None:
                trial_config = self.ctx.trial_config(self.cfg, seed)
                metrics["ray_node_id"] = records.run_file(h, seed, "ray_node_id")
                source = records.run_file(h, seed, "mlflow_run_id")
                cfg = training_config(trial_config)
                records.write(self.kind, self.method, cfg, records.model_rows(self.kind, self.method, cfg, metrics,
                                                                              source))
                self.ctx.events.on_model_reused(self, trial_config, metrics, source)  # listed under this stage
                self.finished_seeds.add(seed)
                progress.skip(1, "model")
                continue
            todo.append(seed)
        return todo

    def fusion_config(self) -> dict[str, Any]:
        return self.cfg

    def next_config(self, trial_id: str) -> dict[str, Any] | None:
        if self.state != "running":
            return None
        for seed in self.todo:
            if self.graph.parent_model_state(self.entry, seed) == "done":
                self.todo.remove(seed)
                return self.trial(trial_id, self.cfg, seed)
        return None

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        config = self.in_flight.pop(trial_id)
        if error or not is_final(result):
            self.failed_seeds[config["seed"]] = "trial failed"
        else:
            self.finished_seeds.add(config["seed"])
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.state == "running" and not self.todo and not self.in_flight:
            if self.failed_seeds and len(self.failed_seeds) == self.planned:
                self.fail("every seed failed")
            else:
                self.finish()

    def model_state(self, seed: int) -> str:
        """'done', 'failed' or 'pending' for this method's model of ``seed`` (for its children),
        from what this stage saw: no storage read per question (a seed whose rows were found is
        checked once, on the first question)."""
        if self.state == "failed" or seed in self.failed_seeds or seed in self.missing:
            return "failed"
        if self.state == "waiting" or seed in self.todo or any(c["seed"] == seed for c in self.in_flight.values()):
            return "pending"
        if seed in self.finished_seeds:
            return "done"
        if self.ctx.records.finished(self.model_hash(seed), seed) is not None:
            self.finished_seeds.add(seed)
            return "done"
        self.missing.add(seed)  # rows in results/, but the model's folder is gone
        self.ctx.progress.note(f"{self.label} seed {seed}: results/ has its rows but {self.ctx.runs} has no "
                               "finished model; its second stages cannot start (delete its rows to train it again)")
        return "failed"
