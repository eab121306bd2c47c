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

The stages themselves (when each is ready, what it makes of a finished trial) are in
:mod:`orchestrator.sweep.stages`. The graph decides and tells
(:class:`orchestrator.sweep.events.StageEvents`): a stage started, ended, chose, reused a model.
It never calls MLflow; the listeners do.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search import Searcher

from orchestrator.spec.configs import first_stage_config, second_stage_config
from orchestrator.spec.experiment import Experiment, MethodEntry, stages
from orchestrator.sweep.context import SweepContext
from orchestrator.sweep.fusion import FusionSizes
from orchestrator.sweep.stages import Node, RepeatNode, TuneNode
from trainables.fused import fusion_key
from trainables.reports import member_result
from trainables.trial import group_members


def member_id(trial_id: str, i: int) -> str:
    """The id of the ``i``-th model of a trial: the trial's own id for the first (a trial of one
    model is the plain case), ``<trial id>/<i>`` for the others of a fused group."""
    return trial_id if i == 0 else f"{trial_id}/{i}"


def trial_members(trial_id: str, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(member id, trial config) of each model a Ray Tune trial trains (one, or a fused group's K)."""
    return [(member_id(trial_id, i), c) for i, c in enumerate(group_members(config))]


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
        return second_stage_config(exp, entry, parent, self.ctx.machine, self.ctx.runs)

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
