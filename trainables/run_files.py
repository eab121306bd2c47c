"""What a run writes to its folder: the checkpoint it resumes from after a crash or preemption
(:func:`save_checkpoint`, :func:`resume`; :func:`inject_crash`, the fault injection the resilience
tests use), and its result (:func:`save_run`: config.json, model.pt, logits.npz, metrics.json;
:func:`load_metrics` reads the last back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables import storage
from trainables.config import config_hash
from trainables.errors import WbsweepError, disk_full_cause, free_bytes, nearly_full, size_text
from trainables.models import Network

# --- checkpoints: nothing lost when a trial is killed -----------------------------------------

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, cfg: dict[str, Any], model: Network, opt, sched, gen: torch.Generator,
                    progress: dict[str, Any], seconds: float) -> None:
    """Everything needed to continue bit-for-bit: weights, optimizer and schedule, the data RNG and
    the best epoch so far. Written to a temporary name and renamed, so a crash mid-write leaves the
    previous checkpoint intact."""
    state = {
        "config_hash": config_hash(cfg), "seed": cfg["seed"], "model": model.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
        **{k: v for k, v in progress.items() if k != "seconds"}, "seconds": progress["seconds"] + seconds,
    }
    with writing(out / f"{CHECKPOINT}.tmp"):
        torch.save(state, out / f"{CHECKPOINT}.tmp")
    os.replace(out / f"{CHECKPOINT}.tmp", out / CHECKPOINT)


def resume(out: Path, cfg: dict[str, Any], model: Network, opt, sched, gen: torch.Generator) -> dict[str, Any]:
    """The training progress to continue from: this run's checkpoint if it has one (of the same
    config and seed: the seed is not in the config hash, and a folder reused for another seed
    must not continue that seed's training), else a fresh start."""
    fresh: dict[str, Any] = {"epoch": 0, "best_acc": -1.0, "best_epoch": 0, "best_state": None, "history": [],
                             "seconds": 0.0}
    path = out / CHECKPOINT
    if not path.exists():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict moves to device
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: start over rather than fail the trial
        print(f"wbsweep: checkpoint {path} is torn or unreadable ({one_line(exc)}); this model trains from its "
              "first epoch (nothing else is lost)", file=sys.stderr)
        return fresh
    if state.get("config_hash") != config_hash(cfg) or state.get("seed", cfg["seed"]) != cfg["seed"]:
        return fresh
    model.load_state_dict(state["model"])
    # How the update is computed (fused or not) is this process's choice, not the checkpoint's.
    how = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, flags in zip(opt.param_groups, how, strict=True):
        group.update(flags)
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    progress = {k: state[k] for k in (*fresh, "forgetting") if k in state}
    if "forgetting" in progress:
        progress["forgetting"] = {k: v.to(gen.device) for k, v in progress["forgetting"].items()}
    return progress


def inject_crash(*outs: Path, epoch: int) -> None:
    """Fault injection for tests: with WBSWEEP_INJECT_CRASH=N the process dies at the end of epoch
    N, once per run (a marker file stops the retried trial from dying again); with
    WBSWEEP_INJECT_CRASH_SEEDS=1,2 only the runs of those seeds (fewer restarts, a shorter test).
    ``outs``: the run folders of the process (a fused group's several); every run due to crash is
    marked before the process dies."""
    at = os.environ.get("WBSWEEP_INJECT_CRASH")
    if not at or int(at) != epoch:
        return
    seeds = os.environ.get("WBSWEEP_INJECT_CRASH_SEEDS")
    due = [out for out in outs if not (out / ".crash-injected").exists()
           and not (seeds and out.name not in {f"seed{s.strip()}" for s in seeds.split(",")})]
    for out in due:
        (out / ".crash-injected").write_text(str(epoch))
    if due:
        os._exit(17)


# --- the finished run ---------------------------------------------------------------------


def save_run(out: Path, cfg: dict[str, Any], model: Network, metrics: dict[str, Any]) -> None:
    """Write config, checkpoint, logits and metrics; metrics.json last and atomically, because its
    presence is what marks the run as finished."""
    arrays = metrics.pop("_arrays")
    with writing(out / "config.json.tmp"):
        (out / "config.json.tmp").write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(out / "config.json.tmp", out / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # the plain layout, whatever trained
    # the ModelSpec too, so that the network can be rebuilt from this file alone (network_from_run)
    spec = {"spec": dataclasses.asdict(model.spec)} if model.spec is not None else {}
    with writing(out / "model.pt.tmp"):
        torch.save({"model": state, "config": cfg, **spec}, out / "model.pt.tmp")
    os.replace(out / "model.pt.tmp", out / "model.pt")
    with writing(out / "logits.npz.tmp"), open(out / "logits.npz.tmp", "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(out / "logits.npz.tmp", out / "logits.npz")
    with writing(out / "metrics.json.tmp"):
        (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=2, default=float))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    (out / CHECKPOINT).unlink(missing_ok=True)  # model.pt now holds the result


@contextlib.contextmanager
def writing(tmp: Path) -> Iterator[None]:
    """Writing the temporary file ``tmp`` (renamed once whole): on failure it is removed, and a full
    disk, which PyTorch's writer reports only as "file write failed", is an OSError ENOSPC naming
    the file and the space left, so that the sweep recognises it and stops in one line."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if disk_full_cause(exc) is not None or nearly_full(tmp.parent):
            raise OSError(errno.ENOSPC, f"No space left on device while writing {tmp.parent / tmp.name[:-4]} "
                                        f"({size_text(free_bytes(tmp.parent))} free)") from exc
        raise


def load_metrics(run: str | Path) -> dict[str, Any] | None:
    """The metrics of a finished run (a local folder or a storage location), or None if it has not
    finished. A torn metrics.json counts as not finished: the model is trained again."""
    return storage.read_json_object(storage.join(run, "metrics.json"))


def retrain_hint(folder: Path) -> str:
    """What to do about a finished run's torn file: train that model again. A sweep's model
    (``DIR/runs/<hash>/seed<k>``) counts as done while its results rows exist, so both go."""
    folder = Path(folder)
    if folder.parent.parent.name == "runs" and folder.name.startswith("seed"):
        results = folder.parent.parent.parent / "results"
        return (f"restore it from a copy, or move {folder} away, delete {results}/*-{folder.parent.name}-s"
                f"{folder.name[4:]}.parquet and run the spec again (that model is trained again)")
    return f"restore it from a copy, or delete {folder} and train the model again"


def load_model_file(path: Path, fix: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """A ``model.pt`` (or checkpoint) as written by :func:`save_run`: a dict with the weights under
    "model". A missing, torn (a full disk, a copy cut short) or foreign file is one WbsweepError line
    naming it and saying ``fix`` (default: :func:`retrain_hint`), never PyTorch's traceback."""
    fix = fix or retrain_hint(path.parent)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise WbsweepError(f"{path} does not exist; {fix}.") from None
    except Exception as exc:  # noqa: BLE001 - a torn zip, a pickle error, a foreign file: all the same to the user
        raise WbsweepError(f"{path} is torn or not a wbsweep model file ({one_line(exc)}); {fix}.") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise WbsweepError(f"{path} is not a wbsweep model file (no weights under 'model'); {fix}.")
    return state


def one_line(exc: BaseException) -> str:
    """An exception's type and text on one line, shortened (error messages are one line)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def network_from_run(folder: Path) -> Network:
    """The trained network of a finished run folder, rebuilt from its ``model.pt`` (weights, config
    and the :class:`~trainables.models.ModelSpec` it was built from), in eval mode. A ``model.pt``
    of an earlier version has no spec: the input shape and classes are then read from the dataset
    (this node's cache; its default data root when the recorded one is not here)."""
    from trainables.config import DEFAULTS
    from trainables.models import ModelSpec, build_model, fix_batchnorm_

    state = load_model_file(folder / "model.pt")
    cfg = {**DEFAULTS, **state["config"]}
    if "spec" in state:
        spec = ModelSpec(**state["spec"])
    else:
        from trainables.datacache import cached_dataset

        root = cfg.get("data_root")
        if root is not None and not Path(root).is_dir():
            root = None  # trained elsewhere: this node's default data root
        data = cached_dataset(cfg["dataset"], root, cfg["rho"], val_per_class=cfg["val_per_class"], split=cfg["split"])
        spec = ModelSpec(cfg["model"], data.num_classes, data.x_train.shape[1], data.x_val.shape[-1],
                         cfg["classifier"], cfg["etf_bias"], cfg["width"], etf_seed=cfg["seed"])
    model = build_model(spec)
    if cfg["bn"] == "fixed":
        fix_batchnorm_(model, cfg["bn_scale"])
    model.load_state_dict(state["model"])
    return model.eval()
