"""``wbsweep bench``: how fast wbsweep trains, against a naive trainer, and what orchestration costs.

Every figure is measured on synthetic long-tailed data of the real shapes (nothing to download):
CIFAR100-LT-shaped (3x32x32, 100 classes, rho 100: 10,457 training and 2,000 validation images)
for convolutional models, MNIST-LT-shaped (1x28x28, 10 classes, rho 100) for MLPs. Random pixels
train at the same speed as real ones.

Sections (each returns a dict; the CLI prints them as text or one JSON object):

* :func:`compare`: the naive trainer of trainables/reference.py (DataLoader, per-sample
  torchvision transforms, fp32, ``.item()`` per step) and wbsweep's trainer (trainables/runner.py's
  :class:`~trainables.runner.EpochRunner`), same model, same init, same data, in one process,
  alternating epochs after a warm-up round: training images per second of each and the ratio.
* :func:`check_knobs`: a few epochs from the same init on the same batches with each speed knob
  (channels_last, bf16, CUDA graph, torch.compile) against eager fp32: weights and loss agree?
  On CUDA also counts host synchronisations inside an epoch of the CUDA-graph trainer.
* :func:`knob_timing`: images per second of the fast trainer for each knob combination.
* :func:`full_run`: ``train()`` itself (per-epoch validation, final evaluation, artifacts) for a
  few epochs on the full CIFAR100-LT-shaped set, extrapolated to the paper's 320 epochs.
* :func:`fused`: K models trained as one (trainables/fused.py) against the same K one after the
  other: images per second per model.
* :func:`packed`: N worker processes training at once on one device (what Ray's fractional GPUs
  do) against one alone: aggregate images per second.
* :func:`orchestration_overhead`: N short trials through Ray Tune against the same trainable
  called directly. The only section that needs Ray (imported there, not here).

The sections live in their own modules, this one runs them (:func:`run_bench`) and is the packed
workers' entry point (:func:`main`): orchestrator/bench/setup.py (the synthetic data, the config,
the machine), bench_speed.py (:func:`compare`, :func:`knob_timing`, :func:`full_run`),
bench_fused.py (:func:`fused`), bench_knobs.py (:func:`check_knobs`), bench_packed.py
(:func:`packed`) and bench_overhead.py (:func:`orchestration_overhead`). Their public names are
importable from here too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orchestrator.bench.fused import fused
from orchestrator.bench.knobs import check_knobs, count_host_syncs, is_sync_warning
from orchestrator.bench.overhead import orchestration_overhead
from orchestrator.bench.packed import packed, worker
from orchestrator.bench.setup import (
    SHAPES,
    available_cores,
    bench_config,
    data_kind,
    default_images,
    device_name,
    load_average,
    synthetic_dataset,
)
from orchestrator.bench.speed import compare, full_run, knob_timing
from trainables.errors import WbsweepError
from trainables.models import BACKBONES, check_model_name

__all__ = [
    "SHAPES",
    "available_cores",
    "bench_config",
    "check_knobs",
    "compare",
    "count_host_syncs",
    "data_kind",
    "default_images",
    "device_name",
    "full_run",
    "fused",
    "is_sync_warning",
    "knob_timing",
    "load_average",
    "main",
    "orchestration_overhead",
    "packed",
    "run_bench",
    "synthetic_dataset",
    "worker",
]


# --- the command --------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``wbsweep bench``: the sections the flags ask for; text on stdout, or with --json one JSON
    object on stdout (the text then goes to stderr)."""
    check_model_name(args.model)
    if args.model not in BACKBONES:
        raise WbsweepError(f"unknown model {args.model!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise WbsweepError("--device cuda: torch sees no GPU here; use --device cpu.")
    # On a CPU both trainers get every core this process may use (the targets are for the whole
    # machine; a naive trainer is no faster with DataLoader workers on 2 cores, measured). --threads 1
    # gives the per-core figure, how the cpu preset runs its trials (cpus_per_trial 1).
    threads = args.threads or (available_cores() if args.device == "cpu" else None)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_sections(args, overrides, threads)
    finally:  # the caller's setting (the CLI exits; a test or notebook goes on)
        torch.set_num_threads(threads_before)


def _run_sections(args: argparse.Namespace, overrides: dict[str, Any], threads: int | None) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    result: dict[str, Any] = {}
    failures: list[str] = []

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2, default=_json_default))

    def section(name: str, fn: Callable[[], Any]) -> None:
        try:
            result[name] = fn()
        except WbsweepError:
            raise
        except Exception as exc:  # a broken section is reported; the others still run
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        save()

    width = args.width
    if not args.skip_compare:
        try:
            result.update(compare(args.device, args.model, args.batch_size, args.images, args.rounds, threads,
                                  args.naive_workers, args.fast_epochs, width, overrides, log))
        except WbsweepError:
            raise
        except Exception as exc:
            failures.append(f"compare: {type(exc).__name__}: {exc}")
            log(f"compare FAILED: {type(exc).__name__}: {exc}")
            result.update({"device": args.device, "model": args.model, "error": str(exc)})
    else:
        result.update({"device": args.device, "model": args.model})
    save()
    if args.check_knobs:
        section("knob_check", lambda: check_knobs(args.device, args.model, args.batch_size, width=width,
                                                  with_torch_compile=args.with_torch_compile, log=log))
    if args.knob_timing:
        section("knob_timing", lambda: knob_timing(args.device, args.model, args.batch_size, args.images, width=width,
                                                   with_torch_compile=args.with_torch_compile, log=log))
    if args.full_run:
        for m in (args.full_run_models or args.model).split(","):
            section(f"full_run_{m}", lambda m=m: full_run(args.device, m, args.full_run, args.batch_size, overrides,
                                                          args.images, log=log))
    if args.packed:
        log(f"packed trials: {args.model}, {args.packed} processes on one {args.device} device vs one alone, "
            f"{args.packed_seconds:g} s each")
        for mode in args.packed_compile.split(","):
            section(f"packed_{mode}", lambda mode=mode: packed(
                args.device, args.model, args.packed, args.packed_seconds, args.batch_size, args.images, width,
                {**overrides, "compile": mode}, log=log))
    if args.fused:
        section("fused", lambda: fused(args.device, args.model, args.fused, args.batch_size, width, args.rounds,
                                       args.fused_dataset, args.images, overrides, log=log))
    if args.overhead:
        section("orchestration", lambda: orchestration_overhead(args.overhead_trials, args.overhead_epochs, log=log))
    if failures:
        result["failures"] = failures
    save()
    if args.json:
        print(json.dumps(result, default=_json_default))
    return 1 if failures else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.bench.command --worker JSON`` runs one packed trial (see :func:`worker`);
    the benchmark itself is ``wbsweep bench`` (this module does not import the CLI: cli imports it)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        worker(json.loads(argv[1]))
        return 0
    print("usage: python -m orchestrator.bench.command --worker JSON (a packed trial); "
          "the benchmark is `wbsweep bench`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
