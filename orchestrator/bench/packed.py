"""Packed trials (``wbsweep bench --packed N``): N worker processes training at once on one device,
as Ray's fractional GPUs pack trials, against one process alone.

Each worker is ``python -m orchestrator.bench.command --worker JSON`` (:func:`worker`; the entry point is
orchestrator/bench/command.py's ``main``), driven through its stdin and stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.bench.setup import (
    Log,
    _setup,
    available_cores,
    bench_config,
    data_kind,
    default_images,
    synthetic_dataset,
)
from trainables.device_data import DeviceData
from trainables.errors import WbsweepError
from trainables.evaluation import predict
from trainables.runner import Knobs
from trainables.train import build_training, pick_device


def _trial_epoch(run: Any, runner: Any, dd: DeviceData, knobs: Knobs) -> int:
    """One epoch as train() runs it: training, schedule step, validation predictions, one sync."""
    loss_sum, seen = runner.epoch()
    run.sched.step()
    pred = predict(run.model, dd, "val", run.cfg["eval_batch_size"], knobs)
    float(loss_sum)
    pred.cpu()
    return seen


def worker(spec: dict[str, Any]) -> None:
    """One packed trial (a separate process): set up and warm up, print "ready", wait for a line on
    stdin, train epochs (with validation) for ``seconds``, print {"images", "seconds"} as JSON."""
    dev = _setup(spec["device"], spec["threads"])
    data = synthetic_dataset(data_kind(spec["model"]), spec["images"], seed=spec["seed"])
    cfg = bench_config(spec["model"], spec["device"], spec["batch_size"], spec["width"], spec["overrides"])
    dd = DeviceData(data, dev)
    torch.manual_seed(spec["seed"])
    run = build_training(cfg, dd)
    knobs = run.knobs
    runner = run.runner()
    _trial_epoch(run, runner, dd, knobs)
    print("ready", flush=True)
    sys.stdin.readline()
    t0, images, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < spec["seconds"] or epochs == 0:
        images += _trial_epoch(run, runner, dd, knobs)
        epochs += 1
    print(json.dumps({"images": images, "seconds": time.perf_counter() - t0, "epochs": epochs}), flush=True)


def _run_workers(k: int, spec: dict[str, Any], timeout: float = 300.0) -> list[dict[str, Any]]:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    procs = []
    for i in range(k):
        # orchestrator.bench.command's main() runs worker(): the command module, importing this one, not the reverse
        cmd = [sys.executable, "-m", "orchestrator.bench.command", "--worker", json.dumps({**spec, "seed": i})]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=root))
    errors: list[str] = [""] * k

    def drain(i: int, p: subprocess.Popen) -> None:  # keep stderr from filling its pipe
        errors[i] = p.stderr.read()

    drains = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in drains:
        t.start()
    try:
        deadline = time.monotonic() + timeout
        for i, p in enumerate(procs):
            line = p.stdout.readline().strip()
            if line != "ready" or time.monotonic() > deadline:
                p.wait(timeout=30)
                raise WbsweepError(f"packed worker {i} did not start: {line or ''} {errors[i][-800:]}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for i, p in enumerate(procs):
            line = p.stdout.readline().strip()
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                p.wait(timeout=30)
                raise WbsweepError(f"packed worker {i} failed: {line} {errors[i][-800:]}") from None
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def packed(device: str = "cuda", model: str = "resnet32", trials: int = 4, seconds: float = 15.0,
           batch_size: int = 64, images: int | None = None, width: int | None = None,
           overrides: dict[str, Any] | None = None, log: Log = print) -> dict[str, Any]:
    """Aggregate training throughput of ``trials`` processes training at once on one device (each an
    epoch loop with validation, like a trial) against one process alone. CPU threads per process:
    the cores divided among the trials (as cpus_per_trial does under Ray)."""
    dev = pick_device(device)
    cores = available_cores()
    n = images if images is not None else default_images(dev, model)
    base = {"device": device, "model": model, "batch_size": batch_size, "width": width, "images": n,
            "overrides": overrides or {}, "seconds": seconds}
    out: dict[str, Any] = {"packed_trials": trials, "seconds": seconds}
    for k in (1, trials):
        res = _run_workers(k, {**base, "threads": max(1, cores // k)})
        rates = [r["images"] / r["seconds"] for r in res]
        out[f"img_per_s_{k}"] = round(sum(rates), 1)
        out[f"per_trial_img_per_s_{k}"] = [round(v, 1) for v in rates]
        log(f"  {k} trial(s) at once ({max(1, cores // k)} CPU threads each): {sum(rates):10.1f} img/s in all"
            + (f" ({', '.join(f'{v:.0f}' for v in rates)})" if k > 1 else ""))
    out["single_img_per_s"] = out.pop("img_per_s_1")
    out["packed_img_per_s"] = out.pop(f"img_per_s_{trials}")
    out["packed_speedup"] = round(out["packed_img_per_s"] / out["single_img_per_s"], 2)
    log(f"  {trials} packed trials: {out['packed_speedup']:.2f}x the throughput of one")
    return out
