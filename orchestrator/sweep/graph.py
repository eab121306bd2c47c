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
"""

from __future__ import annotations

import itertools
import json
import os
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from orchestrator.spec import early_stopping as early_stop
from orchestrator.spec.space import discrete_points, optuna_space, point_key
from trainables.config import config_hash
from trainables.trial import finished_metrics, group_members, training_config

if TYPE_CHECKING:
    from orchestrator.spec.experiment import MethodEntry
    from orchestrator.sweep.driver import Sweep
    from orchestrator.sweep.fusion import FusionSizes


def finished(result: dict | None) -> bool:
    """Whether a trial's last result is its final report (Tune flattens it to ``final/...`` keys
    before the searcher sees it)."""
    return bool(result) and ("final" in result or any(k.startswith("final/") for k in result))


def member_id(trial_id: str, i: int) -> str:
    """The id of the ``i``-th model of a trial: the trial's own id for the first (a trial of one
    model is the plain case), ``<trial id>/<i>`` for the others of a fused group."""
    return trial_id if i == 0 else f"{trial_id}/{i}"


def trial_members(trial_id: str, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(member id, trial config) of each model a Ray Tune trial trains (one, or a fused group's K)."""
    return [(member_id(trial_id, i), c) for i, c in enumerate(group_members(config))]


def member_result(result: dict | None, i: int) -> dict[str, Any] | None:
    """What model ``i`` of a fused group's trial reported at its end, in a single trial's form
    (``objective`` and ``final``), or None when it did not finish (it diverged, the trial failed).
    Reads the nested result the callbacks get and the flattened one (``group/<i>/...``) the searcher gets."""
    if not result:
        return None
    group = result.get("group")
    if isinstance(group, dict):
        final = group.get(str(i))
        objective_ = None if not isinstance(final, dict) else final.get("objective")
    else:
        objective_ = result.get(f"group/{i}/objective")
        final = True
    if objective_ is None or "diverged" in (final if isinstance(final, dict) else {}):
        return None
    return {"objective": objective_, "final": final}


def end_open_trials(storage, study_id: int) -> None:
    """End FAIL the trials of a study left RUNNING (cut off) or WAITING (enqueued, never run)."""
    from optuna.trial import TrialState

    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


class Node:
    """One stage. Subclasses say when it is ready and what its next trial config is."""

    kind = ""

    def __init__(self, sweep: Sweep, entry: MethodEntry, planned: int):
        self.sweep, self.entry, self.planned = sweep, entry, planned
        self.method = entry.method.name
        self.key = f"{self.kind}:{self.method}"
        self.label = f"{self.kind} {self.method}"
        self.state = "waiting"  # waiting -> running -> done | failed
        self.reason = ""
        self.in_flight: dict[str, dict[str, Any]] = {}  # trial id -> trial config
        self._parent_run: str | None = None

    # -- shared ------------------------------------------------------------------------------
    def parent_run(self) -> str:
        """This stage's MLflow parent run, created (or re-attached) when it first needs it."""
        if self._parent_run is None:
            exp = self.sweep.exp
            tags = {"wbsweep.stage": self.kind, "wbsweep.method": self.method, "wbsweep.preset": exp.preset}
            name = f"{self.kind}/{self.method}"
            if exp.variant is not None:  # one spec over several datasets/models: a parent run each
                tags["wbsweep.variant"] = str(exp.variant)
                name = f"{name} [{exp.variant}]"
            self._parent_run = self.sweep.tracker.run(name, tags)
        return self._parent_run

    def end_parent_run(self, status: str = "FINISHED", reason: str = "") -> None:
        """End this stage's MLflow run, if it has one, through the sweep's outbox: the run may be
        made by a call deferred before this one (the store was unavailable)."""
        tracker = self.sweep.tracker

        def end() -> None:
            if self._parent_run is not None:
                tracker.finish(self._parent_run, status, reason)

        self.sweep.outbox(f"the end of the {self.label} run", end)

    def fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason
        self.sweep.progress.stage_failed(self.label, reason)
        self.end_parent_run("FAILED", reason)

    def start(self) -> None:
        self.state = "running"
        self.sweep.progress.stage_started(self.label)

    def finish(self) -> None:
        self.state = "done"
        self.sweep.progress.stage_done(self.label)
        self.end_parent_run()

    def stop(self, status: str, reason: str) -> None:
        """The sweep stops before this stage is done: its run ends ``status`` (KILLED, FAILED) with
        the reason; it stays 'waiting' or 'running' for the status file (a resume continues it)."""
        if self.state in ("waiting", "running"):
            self.end_parent_run(status, reason)

    def trial(self, trial_id: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        config = {**self.sweep.trial_config(cfg, seed), "_stage": self.key}
        self.in_flight[trial_id] = config
        return config

    def fusion_key(self) -> tuple[str, ...] | None:
        """What this stage's models share with those they may be fused with (see
        :func:`trainables.fused.fusion_key`); None: they train alone. Only asked while running."""
        return None

    def fusion_config(self) -> dict[str, Any]:
        """A training config of this stage's models (what ``fuse: auto`` measures); asked only of a
        stage with a fusion key."""
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

    def __init__(self, sweep: Sweep, entry: MethodEntry, planned: int):
        super().__init__(sweep, entry, planned)
        self.issued = 0
        self.results: list[tuple[float, int, dict[str, Any]]] = []  # (objective, Optuna trial number, config)
        self.search = sweep.exp.searched_for(entry.method)
        self.seed = sweep.exp.seeds[0]
        self.pruned = 0  # trials stopped early (orchestrator.spec.early_stopping), this run's and a resumed study's

    def step(self) -> None:
        if self.state != "waiting":
            return
        base = self.sweep.base_config(self.entry)
        if base is None:  # the parent's config is not chosen yet
            return
        if isinstance(base, str):
            return self.fail(base)
        parent_state = self.sweep.parent_model_state(self.entry, self.seed)
        if parent_state == "failed":
            return self.fail(f"its first stage '{self.entry.method.parent}' failed for seed {self.seed}")
        if parent_state == "pending":
            return
        self.base = base
        # What the search is about: the base config's science (its config hash: not the device, threads,
        # paths or options added later at their defaults), the objective's LA variants, the space, the
        # budget. A rerun on another machine, or by a newer version, finds the stage's choice again.
        key = config_hash({"base": config_hash(training_config(self.sweep.trial_config(base, self.seed))),
                           "la": list(base["la"]), "search": self.search, "trials": self.planned, "seed": self.seed,
                           **early_stop.key(self.sweep.exp)})
        self.record = self.sweep.out / "stages" / f"tune-{self.method}-{key}.json"
        searched = self.recorded_choice()
        if searched is not None:
            self.sweep.chosen[self.method] = {**base, **searched}  # this run's device, threads, paths
            self.sweep.progress.skip(self.planned, "choice")
            self.finish()
            return
        self.open_study(f"{self.sweep.exp.name}-{self.method}-{key}")
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
            self.sweep.progress.note(f"{self.label}: unreadable record {self.record.name} ({exc}); moved to "
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

        storage = self.sweep.optuna_storage()
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
                self.sweep.progress.total -= self.planned - planned
                self.planned = planned
        self.results = [(float(t.value), t.number, self.sweep.trial_config({**self.base, **t.params}, self.seed))
                        for t in earlier]
        self.issued = len(self.results) + self.pruned
        # the order the trials were proposed in: the study's trial numbers, then this run's proposals
        self.proposals = itertools.count(max(numbers, default=-1) + 1)
        self.proposed: dict[str, int] = {}
        if self.issued:
            self.sweep.progress.skip(self.issued, "study")
        # A new seed per resume, so the sampler does not propose the finished points again. constant_liar
        # explicitly (Optuna 5's default, not 4's): trials in flight count as bad, not as unexplored.
        sampler = optuna.samplers.TPESampler(seed=self.seed + len(earlier), constant_liar=True)
        self.study_name = name
        self.optuna = OptunaSearch(space=optuna_space(self.search), metric="objective", mode="max",
                                   sampler=sampler, storage=storage, study_name=name, points_to_evaluate=points)

    def stop(self, status: str, reason: str) -> None:
        """Also the study's trials in flight (and points enqueued for it) end FAIL, as a resume would
        end them: they do not count towards the budget; the resumed search proposes others."""
        super().stop(status, reason)
        if getattr(self, "study_name", None):
            storage = self.sweep.optuna_storage()
            end_open_trials(storage, storage.get_study_id_from_name(self.study_name))

    def fusion_key(self) -> tuple[str, ...] | None:
        if early_stop.early_stopping(self.sweep.exp):  # ASHA stops a Ray trial as a whole: one model per trial
            return None
        if not hasattr(self, "_fusion_key"):
            self._fusion_key = self.sweep.fusion_key(self.base, varies=tuple(self.search))
        return self._fusion_key

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
        return self.trial(trial_id, {**cfg, **early_stop.report_epochs(self.sweep.exp, cfg)}, self.seed)

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        config = self.in_flight.pop(trial_id)
        number = self.proposed.pop(trial_id)
        epoch = early_stop.pruned_epoch(self.sweep, trial_id)
        if epoch is not None and not error:  # stopped early: PRUNED, never chosen
            early_stop.tell_pruned(self.optuna, trial_id, result, epoch)
            self.pruned += 1
        else:
            error = error or not finished(result)  # a diverged trial reports no final metrics
            self.optuna.on_trial_complete(trial_id, result=None if error else result, error=error)
            if not error:
                self.results.append((float(result["objective"]), number, config))
        if self.issued >= self.planned and not self.in_flight:
            self.choose()

    def choose(self) -> None:
        if not self.results:
            return self.fail("every trial failed")
        # the best objective; of equal ones (a coarse validation accuracy ties easily) the first trial
        # Optuna proposed, as Optuna's best_trial: never the one that happened to finish first
        objective, _, best = max(self.results, key=lambda r: (r[0], -r[1]))
        cfg = training_config(best)
        chosen = {k: cfg[k] for k in self.base} | {k: cfg[k] for k in self.search}
        self.sweep.chosen[self.method] = chosen
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        searched = {k: chosen[k] for k in self.search}
        tmp.write_text(json.dumps({"config": chosen, "objective": objective, "searched": searched},
                                  indent=2, default=str))
        os.replace(tmp, self.record)
        from orchestrator.sweep.stage_runs import mark_chosen

        mark_chosen(self.sweep, self, best)  # its trial's run: wbsweep.chosen=true
        tracker = self.sweep.tracker
        self.sweep.outbox(f"the choice of {self.label}", lambda: tracker.log_params(
            self.parent_run(), {f"best.{k}": v for k, v in searched.items()}))
        self.sweep.outbox(f"the choice of {self.label}", lambda: tracker.log_metrics(
            self.parent_run(), {"best_objective": objective}))
        self.finish()


class RepeatNode(Node):
    """The chosen config over every seed; finished seeds are skipped, models trained earlier reused."""

    kind = "repeat"

    def __init__(self, sweep: Sweep, entry: MethodEntry, planned: int, tune: TuneNode | None):
        super().__init__(sweep, entry, planned)
        self.tune = tune
        self.todo: list[int] = []
        self.failed_seeds: dict[int, str] = {}

    def step(self) -> None:
        if self.state == "waiting":
            if self.tune is not None:
                if self.tune.state == "failed":
                    return self.fail(f"its tune stage failed: {self.tune.reason}")
                if self.tune.state != "done":
                    return
                cfg = self.sweep.chosen[self.method]
            else:
                cfg = self.sweep.base_config(self.entry)
                if cfg is None:
                    return
                if isinstance(cfg, str):
                    return self.fail(cfg)
                self.sweep.chosen[self.method] = cfg
            self.cfg = cfg
            self.todo = self.sweep.unfinished_seeds(self, cfg)
            self.start()
        if self.state == "running":
            for seed in list(self.todo):
                if self.sweep.parent_model_state(self.entry, seed) == "failed":
                    self.todo.remove(seed)
                    self.failed_seeds[seed] = "its first-stage model failed"
                    self.sweep.progress.failed(f"{self.label} seed {seed}: its first-stage model failed")
            self._maybe_finish()

    def fusion_key(self) -> tuple[str, ...] | None:
        if not hasattr(self, "_fusion_key"):
            self._fusion_key = self.sweep.fusion_key(self.cfg)
        return self._fusion_key

    def fusion_config(self) -> dict[str, Any]:
        return self.cfg

    def next_config(self, trial_id: str) -> dict[str, Any] | None:
        if self.state != "running":
            return None
        for seed in self.todo:
            if self.sweep.parent_model_state(self.entry, seed) == "done":
                self.todo.remove(seed)
                return self.trial(trial_id, self.cfg, seed)
        return None

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        config = self.in_flight.pop(trial_id)
        if error or not finished(result):
            self.failed_seeds[config["seed"]] = "trial failed"
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.state == "running" and not self.todo and not self.in_flight:
            if self.failed_seeds and len(self.failed_seeds) == self.planned:
                self.fail("every seed failed")
            else:
                self.finish()

    def model_state(self, seed: int) -> str:
        """'done', 'failed' or 'pending' for this method's model of ``seed`` (for its children)."""
        if self.state == "failed" or seed in self.failed_seeds:
            return "failed"
        cfg = self.sweep.chosen.get(self.method)
        if cfg is None:
            return "pending"
        h = config_hash(training_config(self.sweep.trial_config(cfg, seed)))
        return "done" if finished_metrics(self.sweep.runs, h, seed) is not None else "pending"


class StageGraph(Searcher):
    """Ray Tune searcher over the nodes of a sweep (see the module docstring). ``sizes``: how many
    models of a fusion key one trial trains (:class:`orchestrator.sweep.fusion.FusionSizes`; None: one)."""

    def __init__(self, nodes: list[Node], sizes: FusionSizes | None = None):
        super().__init__(metric="objective", mode="max")
        self.nodes, self.sizes = nodes, sizes
        self.by_key = {n.key: n for n in nodes}
        self.owner: dict[str, list[tuple[str, Node]]] = {}  # trial id -> (member id, node) of each of its models
        self.error: Exception | None = None  # a bug in the graph: the sweep stops and raises it

    def node_of(self, trial_config: dict[str, Any]) -> Node:
        """The stage of a model's trial config (a member of a group: see :func:`trial_members`)."""
        return self.by_key[trial_config["_stage"]]

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
        fuses = self.sizes is not None and self.sizes.fuses
        for node in self.nodes:
            if node.state != "running":
                continue
            node_key = node.fusion_key() if fuses else None
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

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the graph's state lives in the results, run folders and stage records."""
        with open(checkpoint_path, "w") as fh:
            json.dump({n.key: n.state for n in self.nodes}, fh)

    def restore(self, checkpoint_path: str) -> None:
        pass
