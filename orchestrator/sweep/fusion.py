"""How many models one trial trains: the ``fuse`` resource (``off | K | auto``; issue #14).

Fused training (trainables/fused.py) trains the ready models that share a fusion key
(:func:`trainables.fused.fusion_key`: the architecture, the data, the batch, the arithmetic) as one
batched model in one Ray Tune trial. :class:`FusionSizes` says, per fusion key, how many at most:

* ``off`` (or 1): one model per trial;
* ``K``: up to K per trial, wherever the models can be fused;
* ``auto`` (the default): K as measured where the trials run. The first time a fusion key is seen,
  a Ray task with one trial's resources (so on an autoscaling cluster it asks for the node a trial
  would) runs :func:`trainables.fuse_probe.probe_fusion`: the device's memory and a short timing
  of train()'s single-model training against fused groups of 2, 4, 8, ... models. Its K (1 where
  fusing does not pay) is used for every model of that key, and of any key whose models train at
  the same speed (WB's second stages take their architecture's); the stages of other keys go on
  meanwhile.

What was measured is kept:

* in the results folder, ``DIR/fusion.json`` (per fusion key: K, the probe's figures, when), so a
  resumed sweep groups its models as the first run did;
* on a sweep's own local Ray cluster, also per machine in ``~/.cache/wbsweep/fusion.json``
  (``$WBSWEEP_FUSION_CACHE`` names another file; empty: none), keyed by what sets the speed (the
  model, width, batch, precision, compile mode, device, threads, image shape, the trial's resources,
  the node's CPUs and GPUs, torch's version), so the next sweep on this machine starts at once.
  Delete the file to measure again. A remote or autoscaling cluster is measured once per results
  folder: which nodes a trial lands on is not known to this machine.

A measurement that fails (out of memory, a node that dies) gives K = 1 with a line saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainables.config import DEFAULTS
from trainables.errors import WbsweepError

#: The results folder's record of ``fuse: auto``'s measurements.
FUSION_FILE = "fusion.json"
#: Environment variable naming the per-machine file of measurements ("" turns it off).
CACHE_ENV = "WBSWEEP_FUSION_CACHE"
#: Config keys that set a fused step's speed (the machine cache's key, with the trial's resources).
SPEED_KEYS = ("model", "width", "batch_size", "precision", "compile", "channels_last", "device", "threads",
              "dataset", "augment")


def fuse_size(value: Any) -> int | None:
    """The most models one trial trains for the ``fuse`` resource: ``off`` (1: a model per trial), a
    whole number K from 1, or None for ``auto`` (measured: :class:`FusionSizes`). Only models that can
    be fused are grouped; the others train one per trial whatever K is. Raises WbsweepError for
    anything else."""
    if value is False:  # YAML 1.1 reads an unquoted `fuse: off` as false
        return 1
    if isinstance(value, str) and value.strip().lower() in ("off", "auto"):
        return 1 if value.strip().lower() == "off" else None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = None
    if k is None or isinstance(value, bool) or k < 1 or str(value).strip() != str(k):
        raise WbsweepError(f"fuse must be auto, off or a whole number of models per trial from 1, got {value!r}.")
    return k


def cache_path() -> Path | None:
    """The per-machine file of ``fuse: auto``'s measurements (see the module docstring), or None."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    return Path("~/.cache/wbsweep").expanduser() / FUSION_FILE


def key_id(doc: Any) -> str:
    """A short hash of a JSON-able value (a fusion key): the files' keys."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read(path: Path | None) -> dict[str, Any]:
    """A file of measurements; an unreadable one counts as empty (they are measured again)."""
    if path is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_record(path: Path, key: str, record: dict[str, Any]) -> None:
    """Add ``record`` under ``key`` to the file at ``path``, atomically (a kill leaves the old file or the new)."""
    doc = _read(path)
    doc[key] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


class FusionSizes:
    """The most models a trial of each fusion key trains (see the module docstring).

    ``value``: the ``fuse`` resource; ``out``: the results folder; ``cpus``/``gpus``: one trial's
    resources; ``note``: where a measurement's one line goes. Fusion keys whose models train at the
    same speed (the same :data:`SPEED_KEYS`: e.g. WB's second stages and the first stages of their
    architecture) share one measurement."""

    def __init__(self, value: Any, out: Path, cpus: float, gpus: float, note: Callable[[str], None] = print):
        self.fixed = fuse_size(value)
        self.file = Path(out) / FUSION_FILE
        self.cpus, self.gpus, self.note = cpus, gpus, note
        self.machine: str | None = None
        self.known: dict[str, int] = {}  # key id -> K
        self.by_speed: dict[str, dict[str, Any]] = {}  # speed id -> the measurement's record
        self.pending: dict[str, tuple[Any, str | None, dict[str, Any]]] = {}  # speed id -> (ref, cache key, cfg)
        self.said: dict[str, str] = {}  # speed id -> the line prefetch() keeps until a stage needs the measurement

    @property
    def auto(self) -> bool:
        return self.fixed is None

    @property
    def fuses(self) -> bool:
        """Whether any trial may train more than one model."""
        return self.fixed is None or self.fixed > 1

    def start(self, machine: str | None) -> None:
        """Called once Ray is up: ``machine`` describes a local cluster's hardware for the per-machine
        cache (:func:`machine_of`; None: a remote or autoscaling cluster, no per-machine cache)."""
        self.machine = machine
        if self.auto:
            for kid, record in _read(self.file).items():  # a failed measurement is tried again
                if isinstance(record, dict) and "k" in record and "failed" not in record:
                    self.known[kid] = int(record["k"])
                    if record.get("speed_id"):
                        self.by_speed.setdefault(record["speed_id"], record)

    def measuring(self) -> bool:
        """Whether a measurement is under way (the sweep is not done while one is)."""
        return bool(self.pending)

    def speed_id(self, cfg: dict[str, Any]) -> str:
        """What a config's measurement depends on in this sweep: :data:`SPEED_KEYS` and the trial's resources."""
        config = {k: cfg[k] if cfg.get(k) is not None else DEFAULTS.get(k) for k in SPEED_KEYS}  # defaults spelled out
        return key_id({"config": config, "cpus": self.cpus, "gpus": self.gpus})

    def cache_key(self, cfg: dict[str, Any]) -> str:
        """The per-machine cache's key of a config's measurement: its :meth:`speed_id`, this machine's
        hardware and torch's version."""
        return key_id({"speed": self.speed_id(cfg), "machine": self.machine, "torch": _torch_version()})

    def limit(self, key: tuple[str, ...], cfg: dict[str, Any]) -> int | None:
        """The most models of fusion key ``key`` a trial trains, or None while it is being measured
        (``cfg``: a training config of that key, what the measurement trains)."""
        if self.fixed is not None:
            return self.fixed
        kid = key_id(key)
        if kid in self.known:
            return self.known[kid]
        speed = self.speed_id(cfg)
        self.prefetch(cfg)
        if speed in self.said:  # said when the sweep first needs it (a start that fails says only its error)
            self.note(self.said.pop(speed))
        record = self.by_speed.get(speed) or self._poll(speed)
        return None if record is None else self._record(kid, record)

    def prefetch(self, cfg: dict[str, Any]) -> None:
        """Start measuring the models of training config ``cfg`` unless this sweep or this machine
        already has (called at the sweep's start for the stages it knows, so the measurement runs
        while MLflow and Ray Tune start)."""
        if self.fixed is not None:
            return
        speed = self.speed_id(cfg)
        if speed in self.by_speed or speed in self.pending:
            return
        cache, cached_as = cache_path() if self.machine is not None else None, None
        if cache is not None:
            cached_as = self.cache_key(cfg)
            hit = _read(cache).get(cached_as)
            if isinstance(hit, dict) and "k" in hit:
                self.by_speed[speed] = {**hit, "speed_id": speed}
                self.said[speed] = (f"fuse auto: {describe(cfg)}: K={hit['k']} as measured on this machine "
                                    f"{hit.get('measured_at', '')} ({hit.get('reason', '')}; {cache} keeps it: "
                                    "delete it to measure again)")
                return
        import ray

        from trainables.fuse_probe import probe_task

        share = self.gpus if 0 < self.gpus < 1 else None  # a fraction of a GPU; else the probe's default
        # max_calls=1: the worker exits after it, with its memory (a GPU context, the models, the data)
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0, max_calls=1)(probe_task)
        self.pending[speed] = (task.remote(cfg, share), cached_as, cfg)
        self.said[speed] = f"fuse auto: measuring how many {describe(cfg)} models to fuse per trial (a few seconds)"

    def _poll(self, speed: str) -> dict[str, Any] | None:
        """The measurement of ``speed`` once its task has ended (kept in :attr:`by_speed` and, where it
        succeeded on a local cluster, in the machine's cache), or None while it runs."""
        import ray

        ref, cached_as, cfg = self.pending[speed]
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        del self.pending[speed]
        try:
            probe = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - any failure of the task: one model per trial, said once
            from orchestrator.tracking.tracker import first_line

            self.note(f"fuse auto: measuring {describe(cfg)} failed ({first_line(exc)}); one model per trial")
            probe = {"k": 1, "failed": first_line(exc)}
        else:
            self.note(f"fuse auto: {describe(cfg)} on {probe['device']}: K={probe['k']} ({probe['reason']}; "
                      f"per-model img/s {rates_text(probe)}; measured in {probe['seconds']:.1f} s)")
        record = {**probe, "speed_id": speed, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if "failed" not in record and cached_as is not None:
            try:
                write_record(cache_path(), cached_as, record)  # type: ignore[arg-type]
            except OSError as exc:
                self.note(f"WARNING fuse auto: could not keep the measurement for this machine ({exc})")
        self.by_speed[speed] = record
        return record

    def _record(self, kid: str, record: dict[str, Any]) -> int:
        """Use a measurement for fusion key ``kid`` and keep it in the results folder."""
        record = {**record, "measured_at": record.get("measured_at") or time.strftime("%Y-%m-%d %H:%M:%S")}
        self.known[kid] = int(record["k"])
        try:
            write_record(self.file, kid, record)
        except OSError as exc:  # the measurement still holds for this run
            self.note(f"WARNING fuse auto: could not record the measurement ({exc}); the next run measures again")
        return self.known[kid]


def describe(cfg: dict[str, Any]) -> str:
    """A fusion key's models in a few words, e.g. ``mlp3 width 128, batch 64``."""
    width = f" width {cfg['width']}" if cfg.get("width") else ""
    return f"{cfg.get('model', '?')}{width}, batch {cfg.get('batch_size', '?')}"


def rates_text(probe: dict[str, Any]) -> str:
    """``K=1: 2600, K=2: 5100, ...`` from a probe's per-model throughputs."""
    return ", ".join(f"K={k}: {float(v):.0f}" for k, v in (probe.get("img_per_s_per_model") or {}).items())


def _torch_version() -> str:
    import torch

    return torch.__version__


def machine_of(nodes: list[dict[str, Any]]) -> str:
    """The hardware of a local cluster for the per-machine cache: its host name and each live node's
    CPUs, GPUs and GPU type (Ray's ``accelerator_type:*`` resource), from ``ray.nodes()``."""
    import socket

    parts = []
    for n in nodes:
        if n.get("Alive"):
            res = n.get("Resources") or {}
            parts.append(",".join(f"{k}={res[k]:g}" for k in sorted(res)
                                  if k in ("CPU", "GPU") or k.startswith("accelerator_type:")))
    return f"{socket.gethostname()}: " + "; ".join(sorted(parts))
