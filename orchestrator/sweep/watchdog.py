"""The sweep's liveness checks: a sweep whose cluster is gone or that makes no progress ends, in
one line and resumable, instead of waiting for ever; its status file carries a heartbeat.

Ray Tune never gives up on a trial that waits for resources: when the node under a sweep dies
(its raylet killed by the out-of-memory killer, a lost head node), the trials crash, their retries
wait for a node that never comes back, and the driver would print nothing more and never exit.
:class:`Watchdog` is a Tune callback that runs after every step of Tune's loop. It stops the sweep
by raising :class:`SweepStopped` out of ``tuner.fit`` (Tune stops its trial actors on the way out;
every finished model, each trial's own checkpoint, the Optuna study and the MLflow runs stay, so
running the same command again resumes), after writing the status ``stopped`` with the reason:

(a) the Ray cluster is gone: no live node, or the driver's own node is dead. Ray's GCS declares a
    node dead some 15-20 s after its raylet stops answering its health checks; the driver's own
    raylet is also asked directly (a TCP connection to its port, refused twice in a row: it died),
    so its death is seen within about two ``WBSWEEP_WATCHDOG_CHECK_S`` (how often the cluster is
    asked, default 5 s).
(b) trials wait, nothing runs, no autoscaler can add a node and no live node could hold one of
    them (they need more CPU/GPU than any node has), for ``WBSWEEP_UNSCHEDULABLE_S`` (default
    600 s: a node may still join a fixed cluster with ``ray start --address``).
(c) nothing happened at all (no trial started, reported, ended or was retried) for
    ``WBSWEEP_STALL_S``: default 1800 s, 7200 s on an autoscaling cluster (the cloud may take long
    to provide nodes); 0 turns the check off. A trial reports every epoch (at most once a second),
    so set it above your longest epoch.

The heartbeat: the same loop rewrites the status file every ``WBSWEEP_HEARTBEAT_S`` (default 15 s)
and records that interval (``heartbeat_s``), so that `wbsweep status` can tell a "running" sweep
whose loop has stopped turning (a hung driver, or a dead one on another host, whose pid it cannot
check) from one that runs: see :func:`orchestrator.sweep.status.heartbeat_overdue`.

Every timer here measures a duration on the monotonic clock (``time.monotonic``): a step of the
wall clock (a laptop resumed from suspend, an NTP correction) neither stops a healthy sweep nor
delays a check. Only what is written for other processes and for people stays wall-clock: the
status file's ``updated`` (compared across processes, maybe machines, by `wbsweep status`) and the
lock's heartbeat (orchestrator/record/folder_lock.py), which the same heartbeat rewrites (through
the context's ``lock``): a driver whose folder another command has taken over stops here, in one
line.

A head node lost with the GCS on it ends the driver by Ray itself: its GCS client gives up after
``gcs_rpc_server_reconnect_timeout_s`` (60 s) and exits the process; the status file then ages
like any other dead driver's.

Exit status of a stopped sweep: :data:`EXIT_STOPPED` (3).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.tune import Callback

from orchestrator.environment import env_seconds
from orchestrator.sweep.cluster import trial_bundle
from orchestrator.sweep.context import SweepContext
from trainables.errors import WbsweepError

EXIT_STOPPED = 3


class SweepStopped(WbsweepError):
    """The watchdog ended the sweep because of ``problem``: one line, exit status 3; the same
    command resumes it."""

    exit_code = EXIT_STOPPED

    def __init__(self, problem: str):
        super().__init__(f"{problem}. The sweep stopped; finished models and trial checkpoints are kept: "
                         "run the same command again to resume")
        self.problem = problem


@dataclass
class Limits:
    stall_s: float  # (c): no trial event for this long; 0: off
    unschedulable_s: float  # (b)
    check_s: float  # how often the cluster is asked
    heartbeat_s: float  # how often the status file is rewritten

    @classmethod
    def from_env(cls, autoscaling: bool) -> Limits:
        return cls(stall_s=env_seconds("WBSWEEP_STALL_S", 7200.0 if autoscaling else 1800.0),
                   unschedulable_s=env_seconds("WBSWEEP_UNSCHEDULABLE_S", 600.0),
                   check_s=env_seconds("WBSWEEP_WATCHDOG_CHECK_S", 5.0),
                   heartbeat_s=heartbeat_s())


def heartbeat_s() -> float:
    """The heartbeat interval the driver keeps (written into the status file)."""
    return max(0.1, env_seconds("WBSWEEP_HEARTBEAT_S", 15.0))


def monotonic() -> float:
    """The watchdog's clock: seconds on the monotonic clock (looked up at each call)."""
    return time.monotonic()


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Node:
    """What the watchdog needs of one Ray node (from ``ray.nodes()``): its raylet's address too."""

    node_id: str
    alive: bool
    resources: dict[str, float]
    address: str = ""
    port: int = 0


def nodes_now() -> list[Node]:
    import ray

    return [Node(str(n.get("NodeID")), bool(n.get("Alive")),
                 {k: float(v) for k, v in (n.get("Resources") or {}).items() if k in ("CPU", "GPU")},
                 str(n.get("NodeManagerAddress") or ""), int(n.get("NodeManagerPort") or 0))
            for n in ray.nodes()]


def port_refuses(host: str, port: int) -> bool:
    """Whether nothing listens at HOST:PORT (connection refused: a raylet that died); False when it
    answers or when that cannot be told (a timeout)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


class Watchdog(Callback):
    """Ray Tune callback: the heartbeat, and the checks (a)-(c) of the module's docstring."""

    def __init__(self, ctx: SweepContext, limits: Limits | None = None,
                 nodes: Callable[[], list[Node]] = nodes_now, own_node: str | None = None,
                 clock: Callable[[], float] = monotonic, refuses: Callable[[str, int], bool] = port_refuses):
        self.ctx, self.autoscaling = ctx, ctx.autoscaling
        self.limits = limits or Limits.from_env(ctx.autoscaling)
        self.nodes, self.clock, self.refuses = nodes, clock, refuses
        self.own_node = own_node if own_node is not None else self._own_node()
        now = clock()
        self.last_event = now
        self.last_beat = now
        self.last_check = -float("inf")
        self.unschedulable_since: float | None = None
        self.unanswered = 0  # cluster queries that failed in a row
        self.refused = 0  # checks in a row at which the driver's own raylet refused a connection

    @staticmethod
    def _own_node() -> str:
        import ray

        try:
            return ray.get_runtime_context().get_node_id()
        except Exception:
            return ""

    # --- progress: any trial event ----------------------------------------------------------
    def _event(self, *args, **kwargs) -> None:
        self.last_event = self.clock()

    on_trial_start = on_trial_restore = on_trial_result = on_trial_complete = _event
    on_trial_error = on_trial_recover = on_trial_save = _event

    # --- every step of Tune's loop ------------------------------------------------------------
    def on_step_end(self, iteration, trials, **info):
        now = self.clock()
        if now - self.last_beat >= self.limits.heartbeat_s:
            self.last_beat = now
            self.ctx.status.write()
            lost = self.ctx.lock.beat() if self.ctx.lock is not None else None
            if lost:
                self.stop(lost)
        if now - self.last_check < self.limits.check_s:
            return
        self.last_check = now
        pending = sum(t.status == "PENDING" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        problem = self.problem(now, pending, running)
        if problem:
            self.stop(problem)

    def problem(self, now: float, pending: int, running: int) -> str | None:
        """Why the sweep must stop now, or None."""
        try:
            nodes = self.nodes()
        except Exception as exc:  # the GCS answers with an error (not: does not answer, then Ray blocks)
            self.unanswered += 1
            if self.unanswered >= 3:
                return f"the Ray cluster does not answer ({type(exc).__name__}: {str(exc).strip()[:200]})"
            nodes = None
        else:
            self.unanswered = 0
        if nodes is not None:
            gone = self.cluster_gone(nodes)
            if gone:
                return gone
            stuck = self.unschedulable(now, nodes, pending, running)
            if stuck:
                return stuck
        stall = self.limits.stall_s
        if stall > 0 and now - self.last_event > stall:
            return (f"no trial started, reported or ended for {_clock(now - self.last_event)} "
                    f"(WBSWEEP_STALL_S={stall:g}): a trial or the Ray cluster hangs")
        return None

    def cluster_gone(self, nodes: list[Node]) -> str | None:
        why = "its raylet died: killed, e.g. by the out-of-memory killer, or crashed"
        own = next((n for n in nodes if self.own_node and n.node_id == self.own_node), None)
        if own is not None and own.alive and own.address and own.port > 0:
            self.refused = self.refused + 1 if self.refuses(own.address, own.port) else 0
        if own is not None and (not own.alive or self.refused >= 2):
            return f"the Ray node of this machine is dead ({why}); the sweep cannot go on without it"
        if not any(n.alive for n in nodes):
            return f"the Ray cluster is gone: it has no live node ({why})"
        return None

    def unschedulable(self, now: float, nodes: list[Node], pending: int, running: int) -> str | None:
        """(b): the wait began, or lasted long enough (then the reason)."""
        ctx = self.ctx
        trial = trial_bundle(ctx.cpus, ctx.gpus)
        alive = [n for n in nodes if n.alive]
        holds = any(all(n.resources.get(k, 0.0) >= v for k, v in trial.items() if v > 0) for n in alive)
        if self.autoscaling or not pending or running or holds:
            self.unschedulable_since = None
            return None
        if self.unschedulable_since is None:
            self.unschedulable_since = now
        waited = now - self.unschedulable_since
        if waited < self.limits.unschedulable_s:
            return None
        need = f"{ctx.cpus:g} CPU" + (f" + {ctx.gpus:g} GPU" if ctx.gpus else "")
        have = "; ".join(", ".join(f"{n.resources.get(k, 0):g} {k}" for k in ("CPU", "GPU")) for n in alive)
        return (f"for {_clock(waited)} {pending} trial(s) waited for a node with {need} and no live node has that "
                f"(live nodes: {have}) nor can an autoscaler add one (WBSWEEP_UNSCHEDULABLE_S="
                f"{self.limits.unschedulable_s:g})")

    def stop(self, problem: str) -> None:
        """Record the reason in the status file and end ``tuner.fit``."""
        self.ctx.status.write("stopped", reason=problem)
        raise SweepStopped(problem)
