"""What the Ray cluster a sweep joined can hold: its node types, whether it autoscales, and how
many trials to keep pending so that its autoscaler starts the workers they need.

A sweep on an autoscaling cluster (``ray up cluster/a100.yaml``: a head without GPUs, GPU workers
with ``min_workers: 0``) starts with nothing that fits its trials. It must not refuse to run
because no live node has a GPU; it must ask for what its trials need and wait. Ray does the asking:
every PENDING Tune trial requests a placement group, the autoscaler sees that demand and launches
node types that fit it, and the trial starts when a node joins. What Ray does not do is refuse a
request that no node type can ever hold: the demand then stays pending for ever (the autoscaler
logs "No available node types can fulfill resource request"), so :func:`check_trial_fits` does that
here, before anything is written.

Where the node types come from: the autoscaler's own config (``available_node_types``), which is
not in the GCS in Ray 2.60, so it is read from the file the head's autoscaler process
(``monitor.py --autoscaling-config=...``) was started with, found among this machine's processes
by the cluster's GCS address (``wbsweep run --address auto`` runs on the head with the cluster
launcher); the launcher's ``~/ray_bootstrap_config.yaml`` when no process names one. A cluster
without an autoscaler is what its live nodes are (``ray.nodes()``).
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.errors import WbsweepError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the config on the head


@dataclass
class NodeType:
    """One kind of node: an autoscaler node type, or (on a fixed cluster) one live node.

    ``resources``: what Ray schedules on, {"CPU": 96, "GPU": 8, ...}; empty when the config leaves
    it to the provider to fill in (then it is unknown, and assumed to fit anything).
    ``max_workers``: how many such nodes the cluster may hold (1 for a live node or the head)."""

    name: str
    resources: dict[str, float]
    max_workers: int = 1

    def holds(self, trial: dict[str, float]) -> bool:
        """Whether one node of this type can hold one trial (``{"CPU": 1, "GPU": 1}``)."""
        if not self.resources:
            return True
        return all(self.resources.get(k, 0) >= v for k, v in trial.items() if v > 0)

    def fits(self, trial: dict[str, float]) -> int:
        """How many trials one node of this type holds at once (0 if none; 64 if unknown)."""
        if not self.resources:
            return 64
        counts = [math.floor(self.resources.get(k, 0) / v + 1e-9) for k, v in trial.items() if v > 0]
        return min(counts) if counts else 64

    def describe(self) -> str:
        if not self.resources:
            shape = "resources not declared"
        else:
            shape = ", ".join(f"{self.resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        return f"{self.name} ({shape}{f', up to {self.max_workers}' if self.max_workers != 1 else ''})"


@dataclass
class ClusterShape:
    """The node types of a Ray cluster and whether an autoscaler adds nodes of them on demand.

    ``source``: where the node types were read (an autoscaling config's path, or "live nodes").
    ``max_workers``: the cluster-wide cap on worker nodes of an autoscaling config (None: none)."""

    autoscaling: bool
    node_types: list[NodeType] = field(default_factory=list)
    source: str = "live nodes"
    max_workers: int | None = None

    def describe(self) -> str:
        return "; ".join(t.describe() for t in self.node_types) or "none"


def trial_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One trial's resources as Ray names them."""
    return {"CPU": float(cpus), "GPU": float(gpus)}


def autoscaling_config_path(gcs_address: str) -> Path | None:
    """The config file this machine's autoscaler of the cluster at ``gcs_address`` (HOST:PORT) was
    started with, or the cluster launcher's bootstrap config; None when neither is found."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if not any(a.endswith("autoscaler/_private/monitor.py") or a.endswith("autoscaler/v2/monitor.py")
                           for a in args[:3]):
                    continue
                opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
                if opts.get("gcs-address") == gcs_address and opts.get("autoscaling-config"):
                    path = Path(opts["autoscaling-config"]).expanduser()
                    if path.is_file():
                        return path
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    return bootstrap if bootstrap.is_file() else None


def node_types_of_config(config: dict[str, Any]) -> tuple[list[NodeType], int | None]:
    """The node types of an autoscaling config (``available_node_types``) and its ``max_workers``.
    The head type counts once; a worker type as many times as its ``max_workers`` (bounded by the
    cluster's)."""
    cap = config.get("max_workers")
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()
                     if isinstance(v, int | float) and not isinstance(v, bool)}
        n = 1 if name == head else int(spec.get("max_workers", cap if cap is not None else 2))
        if cap is not None and name != head:
            n = min(n, int(cap))
        types.append(NodeType(name, resources, n))
    return types, (int(cap) if cap is not None else None)


def _has_autoscaler() -> bool:
    """Whether an autoscaler runs for the connected cluster (its status in the GCS says so)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    with contextlib.suppress(Exception):
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
    with contextlib.suppress(Exception):
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return bool(raw) and "autoscaler_report" in json.loads(raw)
    return False


def live_node_types() -> list[NodeType]:
    """The cluster's live nodes, each as a node type of its own."""
    import ray

    nodes = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = n.get("Resources") or {}
            label = "head" if "node:__internal_head__" in res else "node"
            nodes.append(NodeType(f"{label} {n.get('NodeManagerAddress', '?')}",
                                  {k: float(v) for k, v in res.items() if k in ("CPU", "GPU")} or {"CPU": 0.0}))
    return nodes


def cluster_shape(local: bool) -> ClusterShape:
    """The shape of the connected cluster (``ray.init`` first). ``local``: the sweep started it in
    this process, so it never grows."""
    import ray

    if not local:
        path = autoscaling_config_path(ray.get_runtime_context().gcs_address)
        if path is not None:
            import yaml

            try:
                config = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                config = None
            if isinstance(config, dict) and config.get("available_node_types"):
                types, cap = node_types_of_config(config)
                return ClusterShape(True, types, str(path), cap)
        if _has_autoscaler():  # it adds nodes, but of types we cannot see (KubeRay, a driver off the head)
            return ClusterShape(True, [], "an autoscaler whose node types are not readable here")
    return ClusterShape(False, live_node_types(), "live nodes")


def check_trial_fits(shape: ClusterShape, cpus: float, gpus: float, local: bool) -> None:
    """Refuse, in one line, a trial that no node of the cluster can ever hold: one needing a GPU where
    no node type has any, or more of a resource than any node type has. Raises WbsweepError.

    Refused on an autoscaling cluster when none of its node types holds a trial, on a local
    cluster when none of its nodes does (it never grows); a fixed remote cluster may still gain
    such a node (``ray start --address``), so there it is not refused (the progress lines say
    the trials wait)."""
    if shape.autoscaling and not shape.node_types:
        return
    if not shape.autoscaling and not local:
        return
    trial = trial_bundle(cpus, gpus)
    if any(t.holds(trial) for t in shape.node_types):
        return
    kinds = "node types" if shape.autoscaling else "nodes"
    seen = f"{kinds} seen: {shape.describe()}" + (f", from {shape.source}" if shape.autoscaling else "")
    if gpus and not any(t.resources.get("GPU", 0) > 0 for t in shape.node_types):
        fix = "use --gpus-per-trial 0 (with --device cpu), or join a cluster with GPUs (--address)"
        raise WbsweepError(f"{gpus:g} GPU(s) per trial asked for, but the Ray cluster has no GPU on any "
                           f"{kinds[:-1]} ({seen}); {fix}.")
    most_cpu = max(t.resources.get("CPU", 0) for t in shape.node_types)
    most_gpu = max((t.resources.get("GPU", 0) for t in shape.node_types if t.resources.get("CPU", 0) >= cpus),
                   default=0)
    if cpus > most_cpu:
        fix = f"use --cpus-per-trial {max(1, int(most_cpu))} or less"
        what = f"{cpus:g} CPUs per trial"
    else:
        fix = f"use --gpus-per-trial {most_gpu:g} or less" if most_gpu else "use --gpus-per-trial 0"
        what = f"{gpus:g} GPU(s) per trial"
    raise WbsweepError(f"{what} asked for, but no {kinds[:-1]} of the Ray cluster holds a trial of {cpus:g} CPU, "
                       f"{gpus:g} GPU ({seen}); {fix}" + (", or add a node type that does." if shape.autoscaling
                                                           else "."))


def pending_trials(shape: ClusterShape, cpus: float, gpus: float, cap: int | None) -> int:
    """How many trials Ray Tune keeps PENDING (``TUNE_MAX_PENDING_TRIALS_PG``), shapes as above.

    On an autoscaling cluster: as many as the cluster holds at its largest (every node type at its
    ``max_workers``), so that the autoscaler sees the whole demand at once and launches every node it
    may; each node that joins starts trials and Tune asks the sweep for more. Unknown node types: 16.
    On a fixed cluster: as many as its live nodes hold at once. One would fill it only while trials
    last longer than a placement group takes to be granted; short trials (a few seconds) would all
    run one after another on one reused trial actor.
    ``cap`` (``--max-concurrent``) bounds it; at least 1."""
    trial = trial_bundle(cpus, gpus)
    if shape.autoscaling:
        n = sum(t.fits(trial) * t.max_workers for t in shape.node_types) if shape.node_types else 16
    else:
        n = sum(t.fits(trial) for t in shape.node_types)
    if cap is not None:
        n = min(n, cap)
    return max(1, min(n, 1024))


def free_resources() -> dict[str, float]:
    """CPU and GPU free on the live nodes now."""
    import ray

    free = ray.available_resources()
    return {k: float(free.get(k, 0)) for k in ("CPU", "GPU")}


def autoscaler_activity() -> str:
    """What the autoscaler is doing, in a few words ("launching 2 gpu_worker"), or "" when nothing
    is known (no autoscaler, or Ray's v2 autoscaler, whose state `ray status` shows)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw).get("autoscaler_report") or {} if raw else {}
    except Exception:
        return ""
    return describe_autoscaler_report(report)


def describe_autoscaler_report(report: dict) -> str:
    """The launches and failures in one `autoscaler_report` (the dict Ray's v1 autoscaler writes
    under DEBUG_AUTOSCALING_STATUS: pending_launches {type: n}, pending_nodes [(ip, type, status)],
    failed_nodes [(ip, type)]) as a few words; "" when there are none."""
    parts = []
    launching = dict(report.get("pending_launches") or {})
    for _ip, node_type, *_ in report.get("pending_nodes") or []:
        launching[node_type] = launching.get(node_type, 0) + 1
    if launching:
        parts.append("starting " + ", ".join(f"{n} {t}" for t, n in sorted(launching.items())))
    failed = report.get("failed_nodes") or []
    if failed:
        parts.append(f"{len(failed)} node launch(es) failed")
    return "; ".join(parts)


def check_reachable(address: str, what: str, timeout: float = 5.0) -> None:
    """A quick TCP connect, so that an unreachable address fails in seconds with a clear line
    instead of after the client library's long retries."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise WbsweepError(f"{what} address '{address}' is not HOST:PORT.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise WbsweepError(f"cannot reach {what} at {hostport}: {exc.strerror or exc}; is it running?") from None
