"""The stage graph: a whole sweep as ONE Ray Tune experiment.

Each stage of the sweep is a node: ``tune`` (an OptunaSearch over the method's searched knobs, on
validation) or ``repeat`` (the chosen config over the preset's seeds). :class:`StageGraph` is a Ray
Tune ``Searcher`` that hands out the next trial of any node whose inputs are ready, so independent
stages run side by side across the cluster and a stage starts the moment what it needs exists:

* a repeat waits for its method's tune stage to choose a config;
* a second-stage method (WB) waits, per seed, for its parent's model of that seed.

One experiment instead of a Tuner per stage also pays Ray's start-up cost once and reuses the
trial actors throughout. When nothing is ready and nothing runs, the graph says FINISHED; nodes
whose inputs failed are marked failed with the reason instead of waiting forever.

The graph decides and tells (:class:`orchestrator.sweep.events.StageEvents`): a stage started,
ended, chose, reused a model. It never calls MLflow; the listeners do.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from ray.tune.search import Searcher

from orchestrator._adapters.optuna_storage import end_open_trials
from orchestrator._adapters.ray_tune import optuna_trial_of
from orchestrator.spec import early_stopping
from orchestrator.spec.experiment import Experiment, MethodEntry, stages
from orchestrator.spec.space import discrete_points, optuna_space, point_key
from orchestrator.sweep.context import SweepContext
from orchestrator.sweep.fusion import FusionSizes
from trainables.config import config_hash
from trainables.fused import fusion_key
from trainables.methods import method_config
from trainables.reports import is_final, member_result
from trainables.trial import group_members, training_config


def member_id(trial_id: str, i: int) -> str:
    """The id of the ``i``-th model of a trial: the trial's own id for the first (a trial of one
    model is the plain case), ``<trial id>/<i>`` for the others of a fused group."""
    return trial_id if i == 0 else f"{trial_id}/{i}"


def trial_members(trial_id: str, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(member id, trial config) of each model a Ray Tune trial trains (one, or a fused group's K)."""
    return [(member_id(trial_id, i), c) for i, c in enumerate(group_members(config))]


def first_stage_config(exp: Experiment, entry: MethodEntry, machine: dict[str, Any]) -> dict[str, Any]:
    """The training config of a first-stage method before any search: the spec's train options + the
    method's knobs with the preset's fixed hyperparameters + its LA variants + what this sweep adds
    (``machine``: device, threads, data)."""
    cfg: dict[str, Any] = dict(exp.train)
    cfg.update(method_config(entry.method, exp.hyper))
    cfg["la"] = list(entry.la)
    cfg.update(machine)
    return cfg


def prefetch_fusion(exp: Experiment, machine: dict[str, Any], sizes: FusionSizes) -> None:
    """``fuse: auto``: start measuring the models of every first stage (their configs are known before
    anything runs), so the measurement runs while MLflow and Ray Tune start."""
    if not sizes.auto:
        return
    for s in stages(exp):
        if not s.entry.method.parent:
            cfg = first_stage_config(exp, s.entry, machine)
            if fusion_key(cfg, tuple(exp.searched_for(s.entry.method))):
                sizes.prefetch(cfg)


class Node:
    """One stage. Subclasses say when it is ready and what its next trial config is."""

    kind = ""

    def __init__(self, graph: StageGraph, entry: MethodEntry, planned: int):
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

    def __init__(self, graph: StageGraph, entry: MethodEntry, planned: int):
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
        # What the search is about: the base config's science (its config hash: not the device, threads,
        # paths or options added later at their defaults), the objective's LA variants, the space, the
        # budget. A rerun on another machine, or by a newer version, finds the stage's choice again.
        exp = self.ctx.exp
        key = config_hash({"base": config_hash(training_config(self.ctx.trial_config(base, self.seed))),
                           "la": list(base["la"]), "search": self.search, "trials": self.planned, "seed": self.seed,
                           **early_stopping.key(exp)})
        self.record = self.ctx.out / "stages" / f"tune-{self.method}-{key}.json"
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
        if not self.record.exists():
            return None
        try:
            rec = json.loads(self.record.read_text())
            searched = rec.get("searched") or {k: rec["config"][k] for k in self.search}
            if not isinstance(searched, dict) or set(searched) != set(self.search):
                raise ValueError("not this stage's knobs")
            return searched
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
        self.optuna.on_trial_complete(trial_id, result=None, error=False)  # no value and no error: PRUNED

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

    def __init__(self, graph: StageGraph, entry: MethodEntry, planned: int, tune: TuneNode | None):
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
        return config_hash(training_config(self.ctx.trial_config(self.cfg, seed)))

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


class StageGraph(Searcher):
    """Ray Tune searcher over the stages of a sweep (see the module docstring). ``sizes``: how many
    models of a fusion key one trial trains (:class:`orchestrator.sweep.fusion.FusionSizes`; None: one)."""

    def __init__(self, ctx: SweepContext, sizes: FusionSizes | None = None):
        super().__init__(metric="objective", mode="max")
        self.ctx, self.sizes = ctx, sizes
        self.chosen: dict[str, dict[str, Any]] = {}  # method -> training config (without seed)
        self.nodes: list[Node] = []
        self.repeats: dict[str, RepeatNode] = {}
        tunes: dict[str, TuneNode] = {}
        for s in stages(ctx.exp):
            if s.kind == "tune":
                tunes[s.entry.method.name] = TuneNode(self, s.entry, s.trials)
                self.nodes.append(tunes[s.entry.method.name])
            else:
                node = RepeatNode(self, s.entry, s.trials, tunes.get(s.entry.method.name))
                self.repeats[s.entry.method.name] = node
                self.nodes.append(node)
        self.by_key = {n.key: n for n in self.nodes}
        self.owner: dict[str, list[tuple[str, Node]]] = {}  # trial id -> (member id, node) of each of its models
        self.error: Exception | None = None  # a bug in the graph: the sweep stops and raises it

    # --- configs ---------------------------------------------------------------------------
    def base_config(self, entry: MethodEntry) -> dict[str, Any] | str | None:
        """The training config of a method before any search (:func:`first_stage_config`). For a
        second-stage method, its parent's chosen config with its own knobs: None while that is not
        chosen yet, a reason if it never will be."""
        method, exp = entry.method, self.ctx.exp
        if not method.parent:
            return first_stage_config(exp, entry, self.ctx.machine)
        parent = self.chosen.get(method.parent)
        if parent is None:
            node = self.repeats[method.parent]
            failed = node.state == "failed" or (node.tune is not None and node.tune.state == "failed")
            return f"its first stage '{method.parent}' failed" if failed else None
        cfg = dict(parent)
        cfg["parent_hash"] = config_hash(training_config(self.ctx.trial_config(cfg, 0)))
        cfg.update(method_config(method, exp.hyper))
        cfg["la"] = list(entry.la)
        cfg.update(self.ctx.machine)
        return cfg

    def parent_model_state(self, entry: MethodEntry, seed: int) -> str:
        """'done' when the method needs no parent model or the parent's model of ``seed`` exists."""
        if not entry.method.parent:
            return "done"
        return self.repeats[entry.method.parent].model_state(seed)

    def node_of(self, trial_config: dict[str, Any]) -> Node:
        """The stage of a model's trial config (a member of a group: see :func:`trial_members`)."""
        return self.by_key[trial_config["_stage"]]

    # --- the searcher ------------------------------------------------------------------------
    def advance(self) -> None:
        for node in self.nodes:
            node.step()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        try:
            return self._suggest(trial_id)
        except Exception as exc:  # Ray Tune would log it and go on; stop the sweep and re-raise after
            self.error = exc
            return Searcher.FINISHED

    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.error is not None:
            return Searcher.FINISHED
        self.advance()
        members = self._next_models(trial_id)
        if members:
            self.owner[trial_id] = [(mid, node) for mid, node, _ in members]
            if len(members) == 1:
                return members[0][2]
            return {"_group": [config for _, _, config in members], "_runs": members[0][2]["_runs"]}
        if not any(n.in_flight for n in self.nodes) and not (self.sizes is not None and self.sizes.measuring()):
            # Nothing runs and nothing could start: whatever still waits can never be ready.
            for n in self.nodes:
                if n.state == "waiting":
                    n.fail("its inputs never became available")
            return Searcher.FINISHED
        return None

    def _next_models(self, trial_id: str) -> list[tuple[str, Node, dict[str, Any]]]:
        """The models of the next trial, as (member id, stage, trial config): the first model any
        stage has ready, and, where its fusion key allows K > 1 models per trial, up to K - 1 more
        from any stage whose models have the same fusion key (the seeds of a repeat, a search's
        concurrent trials, other methods on the same backbone), in the stages' order. A stage whose
        K is still being measured (``fuse: auto``) is passed over until it is known."""
        members: list[tuple[str, Node, dict[str, Any]]] = []
        key, limit = None, 1
        for node in self.nodes:
            if node.state != "running":
                continue
            node_key = node.fusion_key()
            if members and (node_key is None or node_key != key):
                continue
            if not members:  # the first model's stage sets the group's size (a later one shares its key)
                limit = 1 if node_key is None else self.sizes.limit(node_key, node.fusion_config())  # type: ignore[union-attr]
                if limit is None:  # being measured
                    continue
            while len(members) < limit:
                mid = member_id(trial_id, len(members))
                config = node.next_config(mid)
                if config is None:
                    break
                members.append((mid, node, config))
                key = node_key
            if members and (key is None or len(members) >= limit):
                break
        return members

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        try:
            members = self.owner.pop(trial_id, [])
            for i, (mid, node) in enumerate(members):
                if len(members) == 1:
                    node.complete(mid, result, error)
                else:
                    mine = member_result(result, i)
                    node.complete(mid, mine, error or mine is None)
            self.advance()
        except Exception as exc:
            self.error = exc

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def stop(self, status: str, reason: str) -> None:
        """The sweep stops: every stage not done is told (see :meth:`Node.stop`); a store that fails
        is said in one line (the next run ends the Optuna trials instead)."""
        from orchestrator.tracking.tracker import first_line

        for node in self.nodes:
            try:
                node.stop(status, reason)
            except Exception as exc:  # the Optuna store
                self.ctx.progress.note(f"WARNING {node.label}: could not end its Optuna trials ({first_line(exc)}); "
                                       "the next run of this command does")
