"""What orchestration costs (``wbsweep bench --overhead``): short trials through Ray Tune against
the same trainable called directly. The only bench section that needs Ray (imported there, lazily).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.bench.setup import Log
from trainables.errors import WbsweepError
from trainables.train import train


def timed_trainable(config: dict[str, Any]) -> None:
    """trainables.trial.tune_trainable, noting when the trial's own code started and ended (in the
    folder ``_times``), so the benchmark can tell a worker's one-off start from per-trial costs."""
    from trainables.trial import tune_trainable

    started = time.time()
    tune_trainable(config)
    Path(config["_times"], f"{config['seed']}.json").write_text(json.dumps([started, time.time()]))


def orchestration_overhead(trials: int = 4, epochs: int = 320, cpus_per_trial: int = 1,
                           log: Log = print) -> dict[str, Any]:
    """The same ``trials`` trials (digits-lt, MLP3 of width 128: the cpu preset's model, for
    ``epochs`` epochs, 320 by default: as many per-epoch reports as a paper run) run by calling the
    training function directly, one after another, and through Ray Tune (the sweep's trainable,
    one trial at a time, ``cpus_per_trial`` CPUs each, actors reused as the sweep does).

    Three costs are told apart: starting Ray (once per sweep), starting a trial worker process
    (once per worker: imports, first allocations; the time from ``fit()`` to the first trial's
    code) and the overhead per trial (scheduling, per-epoch reports, result handling: the rest of
    Ray Tune's time beyond the direct calls). The last, as a share of a one-minute trial, is what
    orchestration costs a sweep of such trials."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise WbsweepError("--overhead needs Ray: pip install 'ray[tune]'.") from None

    cfg = {"dataset": "digits-lt", "model": "mlp3", "width": 128, "epochs": epochs, "device": "cpu",
           "threads": cpus_per_trial, "la": ["none", "add", "mult"], "lr": 0.05, "wd": 5e-3}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="wbsweep-overhead-") as tmp:
        train({**cfg, "epochs": 1}, Path(tmp) / "warmup")  # imports and first allocations, not timed
        t0 = time.perf_counter()
        for seed in range(trials):
            train({**cfg, "seed": seed}, Path(tmp) / "direct" / str(seed))
        direct = time.perf_counter() - t0
        torch.set_num_threads(threads)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        t0 = time.perf_counter()
        ray.init(num_cpus=max(cpus_per_trial, 1), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, configure_logging=True)
        ray_start = time.perf_counter() - t0
        times = Path(tmp) / "times"
        times.mkdir()
        try:
            tuner = tune.Tuner(
                tune.with_resources(timed_trainable, {"cpu": cpus_per_trial}),
                param_space={**cfg, "seed": tune.grid_search(list(range(trials))), "_runs": str(Path(tmp) / "runs"),
                             "_times": str(times)},
                tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
                run_config=tune.RunConfig(name="overhead", storage_path=str(Path(tmp) / "ray"), verbose=0),
            )
            fit_start = time.time()
            grid = tuner.fit()
            fit_end = time.time()
            failed = [r.error for r in grid if r.error]
        finally:
            ray.shutdown()
        spans = [json.loads(f.read_text()) for f in times.glob("*.json")]
    if failed or len(spans) != trials:
        raise WbsweepError(f"a Ray Tune trial failed: {failed[0] if failed else 'no timing'}")
    first = min(start for start, _ in spans)
    worker_start = first - fit_start
    through_ray = fit_end - first
    per_trial = (through_ray - direct) / trials
    mean_trial = direct / trials
    result = {"trials": trials, "epochs": epochs, "trial_s": round(mean_trial, 2), "direct_s": round(direct, 2),
              "ray_tune_s": round(through_ray, 2), "ray_start_s": round(ray_start, 2),
              "worker_start_s": round(worker_start, 2), "overhead_per_trial_s": round(per_trial, 2),
              "overhead_pct": round(100 * per_trial / mean_trial, 1),
              "overhead_pct_for_60s_trials": round(100 * max(per_trial, 0.0) / 60.0, 2)}
    log(f"orchestration overhead: {trials} trials of {epochs} epochs (~{mean_trial:.1f} s each): direct "
        f"{direct:.1f} s, through Ray Tune {through_ray:.1f} s after a one-off {ray_start:.1f} s to start Ray and "
        f"{worker_start:.1f} s to start the trial worker -> {per_trial:+.2f} s per trial "
        f"({result['overhead_pct']:+.1f} % of these trials; {result['overhead_pct_for_60s_trials']:.1f} % of a "
        f"one-minute trial)")
    return result
