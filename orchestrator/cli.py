"""The ``wbsweep`` command line.

    wbsweep run table4 [--preset P] [--out DIR] [--storage DIR|s3://...] [--data-root DIR] [--address ADDR]
                       [--tracking-uri URI]
    wbsweep report table4 [--out DIR] [--storage DIR|s3://...] [--format table|markdown|csv|latex]
                          [--claims [PATH]] [--paper] [--all-configs] [--data-root DIR]
    wbsweep train --method wd [--spec table4 --preset cpu] [--seed 0] [--set epochs=5] [--out DIR]
    wbsweep train --config DIR/runs/<hash>/seed<k>/config.json [--out DIR]
    wbsweep list
    wbsweep bench [--device cpu|cuda] [--model resnet32|mlp3] [--json]

A mistake of the user's (a typo in a name, a bad path, a malformed spec) prints one line saying
what is wrong and what to do, and exits with status 2; ``--debug`` shows the traceback instead.

Exit status: 0 done; 1 a sweep finished with failed trials; 2 a user error, or the results folder
is in use by another live command (one line; orchestrator/record/folder_lock.py); 3 the sweep's
watchdog stopped it (its Ray cluster is gone, it made no progress, or another command took its
folder over: one line; orchestrator/sweep/watchdog.py), and the same command resumes it; 130
interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from orchestrator.commands import (
    cmd_analyze,
    cmd_bench,
    cmd_data,
    cmd_list,
    cmd_mlflow_server,
    cmd_report,
    cmd_run,
    cmd_status,
    cmd_train,
)
from trainables.errors import WbsweepError, disk_full_cause, disk_full_reason, exception_chain

#: A full disk: the same status as a sweep it stopped (orchestrator/sweep/diskfull.py, watchdog.EXIT_STOPPED).
EXIT_DISK_FULL = 3

DEFAULT_OUT = "wbsweep-out"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wbsweep", description="Weight-balancing sweeps on Ray Tune + Optuna.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--version", action="version", version=f"wbsweep {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="tune on validation, repeat over seeds, write Parquet + MLflow, print the table")
    r.add_argument("spec", help="a spec name (wbsweep list) or a path to a spec .yaml")
    r.add_argument("--preset", help="preset of the spec (default: the spec's default_preset)")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default ./{DEFAULT_OUT})")
    r.add_argument("--storage", help="where results, model folders and Ray's state go when not in --out: "
                                     "a folder every node shares, or s3://bucket/prefix")
    r.add_argument("--data-root", help="folder with the datasets (CIFAR pickles, IDX files)")
    r.add_argument("--address", help="Ray cluster address (auto or HOST:PORT); default: start a local one")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--cpus-per-trial", type=float)
    r.add_argument("--gpus-per-trial", type=float)
    r.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    r.add_argument("--max-failures", type=int, help="retries of a crashed trial from its checkpoint (default 2)")
    r.add_argument("--fuse", metavar="auto|off|K",
                   help="models trained together in one trial, as one batched model (fused training; default: the "
                        "spec's resources.fuse, else auto: K measured where the trials run, once per machine)")
    r.add_argument("--plan", action="store_true", help="print the stages, models, epochs and the estimated device "
                                                       "time and cost, run nothing")
    r.add_argument("--plan-device", default="here", help="--plan's figures: here (measure on this machine), or a "
                                                         "device recorded by wbsweep bench (h100, h200, ...; bench/)")
    r.add_argument("--price-per-gpu-hour", help="--plan: also the cost at this price per GPU-hour")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="rebuild a table (mean ± std) from the Parquet results")
    rep.add_argument("spec")
    rep.add_argument("--out", default=DEFAULT_OUT)
    rep.add_argument("--storage", help="the run's --storage (default: the one recorded in --out, else --out)")
    rep.add_argument("--preset", help="default: the most recent preset with results")
    rep.add_argument("--format", default="table", choices=["table", "markdown", "csv", "latex"])
    rep.add_argument("--claims", nargs="?", const="", metavar="PATH",
                     help="test the paper's claims (default: the spec's claims file; or your own PATH) on the "
                          "results and on the paper's numbers: Welch's t-test, 95%% CI, a verdict per claim")
    rep.add_argument("--paper", action="store_true", help="with --claims: the paper's own numbers only")
    rep.add_argument("--all-configs", action="store_true",
                     help="list every config hash the folder holds for the spec and preset (one row per method and "
                          "config: seeds, when written, whether it is the config the spec asks for now)")
    rep.add_argument("--data-root", help="the run's --data-root: the data whose fingerprint the current config "
                                         "hashes include (default: as `run`)")
    rep.add_argument("--tracking-uri", help="MLflow store to log the report (and claims) to "
                                            "(default sqlite:///OUT/mlflow.db where it exists)")
    rep.set_defaults(func=cmd_report)

    t = sub.add_parser("train", help="train one model without Ray (for debugging a config)")
    t.add_argument("--method", help="a method name (wbsweep list)")
    t.add_argument("--config", metavar="PATH", help="train a saved run again, exactly: its config.json (or its "
                                                    "folder); says whether its metrics are reproduced")
    t.add_argument("--spec", default="table4", help="the spec whose preset gives the training options")
    t.add_argument("--preset", help="the spec's preset (default: its default preset)")
    t.add_argument("--seed", type=int, help="training seed (default 0, or the saved run's)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto, or the saved "
                                                                     "run's)")
    t.add_argument("--data-root", help="folder holding the datasets (default $WBSWEEP_DATA_ROOT)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training option")
    t.add_argument("--out", default=os.path.join(DEFAULT_OUT, "train"),
                   help="models go to OUT/<config hash>/seed<k>/ (default wbsweep-out/train)")
    t.add_argument("--force", action="store_true", help="train again a model that is already trained")
    t.add_argument("--alone", action="store_true", help="with --config of a run trained fused (fused_k > 1): "
                                                        "train it on its own, not fused again (float32: rounds "
                                                        "differently)")
    t.set_defaults(func=cmd_train)

    st = sub.add_parser("status", help="what is done, running, failed and left in a results folder")
    st.add_argument("--out", default=DEFAULT_OUT)
    st.set_defaults(func=cmd_status)

    an = sub.add_parser("analyze", help="(re)compute analyses (Table 3, figures) of finished runs from checkpoints")
    an.add_argument("--out", default=DEFAULT_OUT)
    an.add_argument("--storage", help="the run's --storage (default: the one recorded in --out, else --out)")
    an.add_argument("--spec", help="only this spec's models (default: every spec with results)")
    an.add_argument("--preset", help="only this preset's models")
    an.add_argument("--names", nargs="+", metavar="NAME", help="analyses to compute (default: each run's own)")
    an.add_argument("--missing", action="store_true", help="compute only what is missing (default: recompute)")
    an.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    an.add_argument("--data-root")
    an.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    an.set_defaults(func=cmd_analyze)

    dp = sub.add_parser("data", help="prepare datasets that are built from files the user supplies")
    dsub = dp.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="build a dataset's split files (mini-imagenet: from ImageNet)")
    prep.add_argument("dataset", choices=["mini-imagenet"])
    prep.add_argument("--imagenet-root", required=True, help="ImageNet's training folder (one folder per synset)")
    prep.add_argument("--out", help="where to write (default: DATA_ROOT/mini-imagenet)")
    prep.add_argument("--size", type=int, default=224,
                      help="crop side in pixels, the model's input (default 224): val/test are Resize + CenterCrop "
                           "to it, training draws RandomResizedCrop to it")
    prep.add_argument("--resize", type=int, help="Resize side (default round(size*256/224), 256): train images "
                                                 "are stored as the centre square at this side")
    prep.add_argument("--seed", type=int, default=0, help="seed of the per-class draw (default 0)")
    prep.add_argument("--per-class", default="500,100,100", help="train,val,test images per class")
    prep.set_defaults(func=cmd_data)

    ms = sub.add_parser("mlflow-server", help="serve the MLflow store of a results folder (UI, HTTP logging)")
    ms.add_argument("--out", default=DEFAULT_OUT)
    ms.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ms.add_argument("--port", type=int, default=5000)
    ms.set_defaults(func=cmd_mlflow_server)

    ls = sub.add_parser("list", help="specs, methods, datasets and models")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("bench", help="images/s of wbsweep's trainer vs a naive one; packing; Ray overhead")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--model", default="resnet32", help="resnet32 (CIFAR-shaped data), mlp3 (MNIST-shaped), ...")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--width", type=int, help="model width (default: the model's own)")
    b.add_argument("--images", type=int, help="training images per epoch (default: all on cuda, a subset on cpu)")
    b.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    b.add_argument("--fast-epochs", type=int, help="wbsweep epochs per round (default 1 on cpu, 5 on cuda)")
    b.add_argument("--threads", type=int, help="torch threads for both trainers (default: every core this "
                   "process may use on cpu, torch's on cuda; 1 gives the per-core figure)")
    b.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers of the naive trainer")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="a knob of the wbsweep trainer: precision=bf16")
    b.add_argument("--json", action="store_true", help="print one JSON object (text goes to stderr)")
    b.add_argument("--json-out", help="also write the JSON to this file")
    b.add_argument("--skip-compare", action="store_true", help="skip naive vs wbsweep (run only the other sections)")
    b.add_argument("--check-knobs", action="store_true", help="do channels_last/bf16/CUDA graph keep the numbers?")
    b.add_argument("--with-torch-compile", action="store_true",
                   help="include compile=torch in --check-knobs, cudagraph+torch in --knob-timing")
    b.add_argument("--knob-timing", action="store_true", help="images/s for each knob combination")
    b.add_argument("--full-run", type=int, metavar="EPOCHS", help="train() for EPOCHS epochs, extrapolate to 320")
    b.add_argument("--full-run-models", help="comma-separated models for --full-run (default --model)")
    b.add_argument("--packed", type=int, metavar="N", help="N trial processes on one device vs one alone")
    b.add_argument("--packed-seconds", type=float, default=15.0)
    b.add_argument("--packed-compile", default="auto", help="compile setting(s) of the packed trials, e.g. auto,off")
    b.add_argument("--fused", type=int, metavar="K", help="K models trained fused vs one after the other "
                   "(an MLP: --model mlp3 --width 128 is the cpu preset's)")
    b.add_argument("--fused-dataset", default="digits-lt", choices=["digits-lt", "synthetic"],
                   help="data of --fused: the cpu preset's digits-lt, or synthetic data of the model's shape")
    b.add_argument("--overhead", action="store_true", help="N short trials through Ray Tune vs called directly")
    b.add_argument("--overhead-trials", type=int, default=4)
    b.add_argument("--overhead-epochs", type=int, default=320, help="epochs (= per-epoch reports) per trial")
    b.set_defaults(func=cmd_bench)
    return p


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("wbsweep")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its database-migration chatter
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WbsweepError as exc:
        if args.debug:
            raise
        print(f"wbsweep: error: {exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", 2)
        _forget(exc)
        return code
    except KeyboardInterrupt as exc:
        print("wbsweep: interrupted; run the same command again to resume.", file=sys.stderr)
        _forget(exc)
        return 130
    except Exception as exc:  # a full disk met by a command that has no handling of its own: one line too
        if args.debug or disk_full_cause(exc) is None:
            raise
        print(f"wbsweep: error: no space left on a disk this command writes to ({disk_full_reason(exc)}); free "
              "space there and run the same command again.", file=sys.stderr)
        _forget(exc)
        return EXIT_DISK_FULL


def _forget(exc: BaseException) -> None:
    """Drop what an exception that became an exit status still holds: the frames of its traceback
    (and of the exceptions it was raised from) keep their locals alive, Arrow tables and torch
    tensors among them, which would otherwise be freed during interpreter shutdown, while the
    native thread pools they belong to are being torn down (an abort, exit status 134)."""
    for e in exception_chain(exc):
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        e.__traceback__ = None


def _release() -> None:
    """What must end before the process does: the Ray cluster a sweep started (or its connection)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        with contextlib.suppress(Exception):  # a cluster already gone: nothing left to stop
            ray.shutdown()


def entry() -> None:
    """The ``wbsweep`` command ([project.scripts]) and ``python -m orchestrator.cli``.

    A run that succeeded exits the ordinary way. An error's exit skips the interpreter's
    finalisation once its output is flushed and Ray is shut down: nothing else needs it, and
    native thread pools (Arrow's, torch's) torn down with objects still alive could turn the
    error's exit status into an abort."""
    code = main()
    if code == 0:
        sys.exit(0)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    _release()
    os._exit(code)


if __name__ == "__main__":
    entry()
