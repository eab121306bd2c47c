"""What each ``wbsweep`` command does: one ``cmd_<name>(args)`` per subcommand of the parser in
orchestrator/cli.py (``wbsweep train`` is :func:`cmd_train`, ``wbsweep mlflow-server``
:func:`cmd_mlflow_server`), and the checks of the arguments they share (``--out``, ``--storage``,
``--data-root``, ``--set``), each a one-line :class:`WbsweepError` when wrong.

A command imports what it needs when it runs: importing this module (and so the CLI) loads
neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from orchestrator.report.reproduce import reproduction, saved_config
from orchestrator.spec.yaml_loader import load as load_yaml
from trainables.errors import WbsweepError

# --- the arguments the commands share ------------------------------------------------------------


def _out_dir(path: str, create: bool, flag: str = "--out") -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise WbsweepError(f"{flag} {out} is a file; give a folder for the results.")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WbsweepError(f"cannot create {flag} {out}: {exc.strerror}.") from None
        if not os.access(out, os.W_OK):
            raise WbsweepError(f"{flag} {out} is not writable; choose another folder.")
    return out


def _storage(arg: str | None, out: Path, spec: str | None = None, create: bool = False) -> str:
    """Where the results live: ``--storage``, else the storage a sweep in ``out`` recorded in its
    status file (so `report` after `run --storage s3://...` needs no flag), else ``out`` itself."""
    from orchestrator.sweep.status import recorded_store
    from trainables import storage

    if arg:
        if storage.is_remote(arg):
            return arg
        arg = arg.removeprefix("file://")
        return str(_out_dir(arg, create=create, flag="--storage").resolve())
    latest = recorded_store(out, spec)
    return latest or str(out.resolve())


@contextlib.contextmanager
def _folder_lock(out: Path, store: str | None = None) -> Iterator:
    """Hold the lock of the results folder ``out`` (and of ``store``, the ``--storage``, when it is a
    folder of its own; an object store is not locked) while a command writes them
    (orchestrator/record/folder_lock.py): a one-line :class:`FolderBusy` error naming the holder when
    another live command holds them. Given back on every way out; a SIGTERM meanwhile is a Ctrl-C."""
    from orchestrator.record.folder_lock import FolderLock
    from trainables import storage

    folders = [out]
    if store and not storage.is_remote(store):
        folders.append(Path(store))
    folders = [f for f in folders if f.is_dir()]  # none yet: nothing to protect, the command says what is missing
    lock = FolderLock(folders, note=lambda line: print(line, file=sys.stderr)).acquire()
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if main:
            signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
        yield lock
    finally:
        lock.release()
        if main and saved is not None:
            signal.signal(signal.SIGTERM, saved)


def _data_root(path: str | None) -> str | None:
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise WbsweepError(f"--data-root {root} is not a folder; point it at the folder that holds the datasets.")
    return str(root)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise WbsweepError(f"--set {item!r}: write KEY=VALUE, e.g. --set epochs=5.")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise WbsweepError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                               "quote strings, write lists as [a, b].") from exc
    return out


# --- the commands -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.spec.experiment import load_experiments

    exps = load_experiments(args.spec, args.preset)  # one, or one per variant (dataset/model) of the preset
    if args.plan:  # stages, models, epochs, estimated device time and cost (orchestrator.report.plan)
        from orchestrator.report import plan as cost

        return cost.plan_command(exps, args)
    out = _out_dir(args.out, create=True)
    store = _storage(args.storage, out, create=True) if args.storage else str(out.resolve())
    with _folder_lock(out, store) as lock:  # before anything is written
        return _run(args, exps, out, store, lock)


def _run(args: argparse.Namespace, exps: list, out: Path, store: str, lock) -> int:
    """`wbsweep run` once the folder is this command's (``lock``)."""
    from orchestrator.report.tables import report
    from orchestrator.sweep.driver import Sweep, SweepOptions
    from orchestrator.tracking.tracker import default_tracking_uri

    exp = exps[0]
    opts = SweepOptions(
        out=out, tracking_uri=args.tracking_uri or default_tracking_uri(out), storage=store,
        data_root=_data_root(args.data_root),
        address=args.address, device=args.device, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, max_failures=args.max_failures,
        fuse=args.fuse,
        quiet=args.quiet, lock=lock,
    )
    started = time.monotonic()  # a duration: a step of the wall clock does not change it
    failures = []
    sweeps = [Sweep(e, opts) for e in exps]  # every variant's preflight (data, resources) before any runs
    for exp, sweep in zip(exps, sweeps, strict=True):
        if len(exps) > 1 and not args.quiet:
            print(f"[variant {exp.variant}]", file=sys.stderr)
        sweep.run()
        failures += sweep.progress.failures
    from orchestrator.record.analyses import ensure_analyses  # models reused from elsewhere get theirs now

    ensure_analyses(store, exp.name, exp.preset, device=args.device, data_root=opts.data_root,
                    tracking_uri=opts.tracking_uri, log=lambda m: print(m, file=sys.stderr))
    minutes = (time.monotonic() - started) / 60
    analyses = sorted({a for e in exps for a in e.train.get("analyses", [])})
    try:
        args_ = (out, exp.name, exp.preset)
        kw = dict(table=exp.paper_table, method_order=[m.method.name for m in exp.methods], title=exp.title,
                  layout=exp.layout, analyses=analyses, store=store)
        kw["current_of"] = current_of(args.spec, out, store, opts.data_root, exps)
        text = report(*args_, "table", **kw)
        print(text)
        _report_to_mlflow(opts.tracking_uri, out, store, exp.name, exp.preset, text,
                          lambda: report(*args_, "csv", **kw))
    except WbsweepError as exc:
        if not failures:
            raise
        print(f"no table: {exc}")  # every trial failed: the reasons follow
    from trainables.storage import join

    print(f"done in {minutes:.1f} min; results: {join(store, 'results')} (Parquet), MLflow: {opts.tracking_uri}"
          + (f"; {len(failures)} failure(s):" if failures else ""))
    for failure in failures:
        print(f"  FAILED {failure}")
    return 1 if failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report.tables import report
    from orchestrator.spec.experiment import load_experiments

    table, order, title, layout, analyses, unknown = None, None, None, "accuracy", None, None
    try:
        exps = load_experiments(args.spec, args.preset)
        exp = exps[0]
        table, order, title, spec = exp.paper_table, [m.method.name for m in exp.methods], exp.title, exp.name
        layout = exp.layout
        analyses = sorted({a for e in exps for a in e.train.get("analyses", [])})
    except WbsweepError as exc:
        if Path(args.spec).suffix in (".yaml", ".yml"):
            raise
        spec, unknown = args.spec, exc  # a spec no longer on disk: the Parquet rows are enough
    out = _out_dir(args.out, create=False)
    store = _storage(args.storage, out, spec)
    why = str(unknown).rstrip(".")  # no spec: the rows as written; which config is current cannot be told
    now = current_of(args.spec, out, store, _data_root(args.data_root)) if unknown is None else lambda *_: why
    if args.all_configs:
        return _report_all_configs(args, store, spec, now, unknown)
    if args.claims is not None or args.paper:
        return _report_claims(args, out, spec, table, unknown, now)
    try:
        text = report(out, spec, args.preset, args.format, table, order, title, layout=layout, analyses=analyses,
                      store=store, current_of=now)
    except WbsweepError:
        if unknown is not None:  # no rows and no such spec: say that (not "run it first")
            raise unknown from None
        raise
    sys.stdout.write(text)
    from orchestrator.tracking.tracker import default_tracking_uri

    uri = args.tracking_uri or (default_tracking_uri(out) if (out / "mlflow.db").exists() else None)
    with _logging_to(out, uri, "the report") as uri:
        _report_to_mlflow(uri, out, store, spec, args.preset, text,
                          lambda: text if args.format == "csv" else report(out, spec, args.preset, "csv", table, order,
                                                                           title, layout=layout, analyses=analyses,
                                                                           store=store, current_of=now))
    return 0


def current_of(spec: str, out: Path, store: str, data_root: str | None, exps: list | None = None):
    """``current_of(preset, rows)`` for the report (orchestrator/report/selection.py): the configs the
    spec's preset resolves to now, computed without Ray (orchestrator/record/current.py), or why the
    spec cannot tell. ``exps``: the experiments already loaded (``run``: the ones it just ran)."""
    from orchestrator.record.current import current_configs
    from orchestrator.spec.experiment import load_experiments
    from trainables.storage import join

    def of(preset: str, rows):
        try:
            loaded = exps if exps and exps[0].preset == preset else load_experiments(spec, preset)
        except WbsweepError as exc:
            return str(exc).rstrip(".")
        return current_configs(loaded, out, join(store, "runs"), data_root, rows)

    return of


def _report_all_configs(args: argparse.Namespace, store: str, spec: str, now, unknown: WbsweepError | None) -> int:
    """`report SPEC --all-configs`: every config hash the folder holds (orchestrator/report/selection.py)."""
    from orchestrator.record.results import read_rows
    from orchestrator.report.all_configs import all_configs
    from trainables.storage import exists, join

    results = join(store, "results")
    if not exists(results):
        raise unknown or WbsweepError(f"{results} does not exist; run `wbsweep run {spec} --out {args.out}` first.")
    sys.stdout.write(all_configs(read_rows(results), spec, args.preset, now, args.format))
    return 0


@contextlib.contextmanager
def _logging_to(out: Path, uri: str | None, what: str) -> Iterator[str | None]:
    """`report`'s MLflow logging to ``uri`` takes the folder's lock: yields ``uri``, or None when
    there is nothing to log to or another live command holds the folder (then one line says that
    ``what`` is not logged; what `report` prints is the same). Its store is re-pointed first when
    the folder was moved or copied (:func:`_own_store`)."""
    from orchestrator.record.folder_lock import FolderBusy

    if not uri:
        yield None
        return
    with contextlib.ExitStack() as holding:
        try:
            holding.enter_context(_folder_lock(out))
        except FolderBusy as busy:
            who = f"{out} is in use by {busy.holder.describe()}" if busy.holder else str(busy)
            print(f"{what} not logged to MLflow: {who}; run the same `wbsweep report` again once it has ended to "
                  "log it", file=sys.stderr)
            yield None
            return
        _own_store(out, uri)
        yield uri


def _own_store(out: Path, uri: str | None) -> None:
    """Before a command logs to ``uri``: where it is the folder's own MLflow store and the folder was
    moved or copied, its artifact locations are re-pointed here, in one line
    (:func:`orchestrator.tracking.tracker.prepare_store`). Call it holding the folder's lock."""
    from orchestrator.record.stores import sqlite_file
    from orchestrator.tracking.tracker import prepare_store

    if uri and sqlite_file(uri) is not None and sqlite_file(uri).exists():
        for note in prepare_store(uri, out / "mlartifacts"):
            print(note, file=sys.stderr)


def _report_to_mlflow(uri: str | None, out: Path, store: str, spec: str, preset: str | None, text: str,
                      table_csv) -> None:
    """The spec-level MLflow run of the report (orchestrator/sweep/stage_runs.py), where there is a store;
    ``table_csv()`` gives the report's table as CSV."""
    if not uri:
        return
    from orchestrator.report.mlflow_run import report_to_mlflow

    try:
        csv = table_csv()
    except WbsweepError:
        csv = None
    report_to_mlflow(uri, out, store, spec, preset, text, csv, log=lambda m: print(m, file=sys.stderr))


def _report_claims(args: argparse.Namespace, out: Path, spec: str, table: int | None,
                   unknown: WbsweepError | None, now=None) -> int:
    """`report SPEC --claims [PATH] [--paper]`: the claims file (default: claims/<spec>.yaml beside
    the spec) tested on the results and on the paper's numbers (orchestrator/report/claims.py)."""
    from orchestrator.report.claims import claims_report, default_path
    from orchestrator.spec.experiment import find_spec
    from orchestrator.tracking.tracker import default_tracking_uri

    path = args.claims
    if not path:
        if unknown is not None:
            raise unknown
        path = default_path(find_spec(args.spec), spec)
        if not path.is_file():
            raise WbsweepError(f"spec '{spec}' has no claims file ({path}); write one (docs/claims.md) and give it "
                               "with --claims PATH.")
    paper = args.paper
    uri = args.tracking_uri or (default_tracking_uri(out) if (out / "mlflow.db").exists() else None)
    store = None if paper else _storage(args.storage, out, spec)
    with _logging_to(out, None if paper else uri, "the claims") as uri:
        sys.stdout.write(claims_report(out, spec, args.preset, path, args.format, paper_table=table, store=store,
                                       paper_only=paper, tracking_uri=uri, current_of=now))
    return 0


def train_fused_again(cfg: dict, out: Path, saved: dict, show) -> dict:
    """A saved run that trained in a fused group (``fused_k`` K > 1), trained fused again: in a group of
    K copies of itself, its run at its place (``fused_slot``), the others in a temporary folder. Its
    rounding depends on nothing else of the group (not the other models' values), so this is its run
    bit for bit (tests/test_fused_reproduce.py); alone, its float32 trajectory differs."""
    import tempfile

    from trainables.fused import train_fused

    k, slot = int(saved["fused_k"]), saved.get("fused_slot")
    where = f"at its place {slot}" if slot is not None else \
        "first (its place in the group was not recorded: a run of an earlier version, which may round otherwise)"
    print(f"the saved run was trained fused (fused_k {k}): training it fused again in a group of {k} copies of "
          f"itself, {where}, so that it rounds as it did ({k}x the arithmetic of one model; --alone: on its own)",
          file=sys.stderr)
    slot = int(slot or 0)
    with tempfile.TemporaryDirectory(prefix=".mates-", dir=out.parent) as mates:
        outs = [out if i == slot else Path(mates) / f"copy{i}" for i in range(k)]
        result = train_fused([cfg] * k, outs, report=lambda rows: slot in rows and show(rows[slot]))[slot]
    if isinstance(result, BaseException):
        raise result
    return result


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.spec.experiment import load_experiment
    from trainables.config import config_hash, resolve_config
    from trainables.datacache import dataset_fingerprint
    from trainables.methods import get_method, method_config
    from trainables.run_files import CHECKPOINT, load_metrics
    from trainables.train import train

    saved = None
    if args.config:
        if args.method:
            raise WbsweepError("give either --config (a saved run's config.json) or --method, not both.")
        saved, cfg = saved_config(args.config)
        for key, value in (("seed", args.seed), ("device", args.device)):
            if value is not None:
                cfg[key] = value
    elif not args.method:
        raise WbsweepError("say what to train: --method M (wbsweep list), or --config PATH/config.json to train a "
                           "saved run again.")
    else:
        exp = load_experiment(args.spec, args.preset)
        method = get_method(args.method)
        cfg = {**exp.train, **method_config(method, exp.hyper), "seed": args.seed or 0,
               "device": args.device or "auto"}
    if args.data_root:
        cfg["data_root"] = _data_root(args.data_root)
    cfg.update(_parse_set(args.set or []))
    full = resolve_config(cfg)
    fingerprint = dataset_fingerprint(full["dataset"], full["data_root"], full["rho"], full["val_per_class"],
                                      full["split"])
    if saved is not None and cfg.get("data_fingerprint") not in (None, fingerprint):
        raise WbsweepError(f"the data here differ from the saved run's ({full['dataset']} fingerprint {fingerprint}, "
                           f"the run's {cfg['data_fingerprint']}); point --data-root at the data it was trained on.")
    if saved is not None and cfg.get("init_from") and not Path(str(cfg["init_from"])).is_file():
        raise WbsweepError(f"the saved run starts from {cfg['init_from']} (its stage-1 model), which does not exist "
                           "here; copy that model.pt there, or --set init_from=PATH.")
    cfg["data_fingerprint"] = fingerprint
    args.seed = int(full["seed"])
    # one folder per config and seed, as a sweep's runs/<hash>/seed<k>: another method or seed never
    # overwrites (or resumes) this one's files, and the same command again continues a cut-short run
    out = _out_dir(args.out, create=True) / config_hash(resolve_config(cfg)) / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"model folder: {out}", file=sys.stderr)
    metrics = load_metrics(out)
    if metrics is not None and not args.force:
        print("this model is already trained (its metrics.json exists): its numbers follow; --force trains it "
              "again, replacing its files", file=sys.stderr)
    else:
        if metrics is not None:
            for name in ("metrics.json", CHECKPOINT):  # a fresh start, not a resume of the finished run
                (out / name).unlink(missing_ok=True)

        def show(m: dict) -> None:
            print(f"epoch {m['epoch']:4d}  loss {m['train_loss']:.4f}  val acc {m['val_acc']:.1f}%", file=sys.stderr)

        # numpy's BLAS on as many threads as torch (a Ray trial's OMP_NUM_THREADS): float64 sums in the
        # same order as in the sweep, so a saved run's FDR is reproduced to the last bit
        from threadpoolctl import threadpool_limits

        before = (load_metrics(saved.parent) or {}) if saved is not None else {}
        with threadpool_limits(int(full["threads"])) if full["threads"] else contextlib.nullcontext():
            if int(before.get("fused_k") or 1) > 1 and not args.alone:
                metrics = train_fused_again(cfg, out, before, show)
            else:
                metrics = train(cfg, out, report=show)
    summary = {k: metrics[k] for k in ("config_hash", "fdr_train", "fdr_test", "best_epoch", "train_seconds")}
    summary["la"] = {la: {k: r[k] for k in ("param", "val_acc", "many", "medium", "few", "avg")}
                     for la, r in metrics["la"].items()}
    print(json.dumps(summary, indent=2))
    if saved is not None:
        from trainables.run_files import load_metrics as saved_metrics

        before = saved_metrics(saved.parent)
        if before is not None:
            print(f"the saved run's metrics ({saved.parent / 'metrics.json'}): {reproduction(before, metrics)}",
                  file=sys.stderr)
        elif (saved.parent / "metrics.json").exists():
            print(f"the saved run's metrics ({saved.parent / 'metrics.json'}) are torn (not a JSON object): nothing "
                  "to compare this run with", file=sys.stderr)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    out = _out_dir(args.out, create=False)
    store = _storage(args.storage, out, args.spec)
    with _folder_lock(out, store):  # it writes analyses, run folders' files and MLflow artifacts
        return _analyze(args, out, store)


def _analyze(args: argparse.Namespace, out: Path, store: str) -> int:
    from orchestrator.record.analyses import ensure_analyses
    from orchestrator.record.results import read_rows
    from orchestrator.tracking.tracker import default_tracking_uri
    from trainables.storage import join

    df = read_rows(join(store, "results"))
    specs = [args.spec] if args.spec else sorted(set(df["spec"]))
    if df.empty or not set(specs) & set(df["spec"]):
        raise WbsweepError(f"no results{' for spec ' + repr(args.spec) if args.spec else ''} in "
                           f"{join(store, 'results')}; run the spec first (`wbsweep run SPEC --out DIR`).")
    uri = args.tracking_uri or (default_tracking_uri(out) if (out / "mlflow.db").exists() else None)
    _own_store(out, uri)
    failed = 0
    for spec in specs:
        counts = ensure_analyses(store, spec, args.preset, names=args.names, force=not args.missing, device=args.device,
                                 data_root=_data_root(args.data_root), tracking_uri=uri,
                                 log=lambda m: print(m, file=sys.stderr))
        skipped = f", {counts['skipped']} without a checkpoint" if counts["skipped"] else ""
        not_done = f", {counts['failed']} not analysed (named above)" if counts["failed"] else ""
        print(f"{spec}: {counts['analysed']} of {counts['models']} model(s) analysed, {counts['rows']} rows written "
              f"to {join(store, 'analyses')}{skipped}{not_done}")
        failed += counts["failed"]
    if failed:  # the others are analysed and written; exit 1 as a sweep with failed trials does
        print(f"wbsweep: {failed} model(s) could not be analysed (each named above with what to do); the others "
              "were", file=sys.stderr)
        return 1
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from trainables import mini_imagenet
    from trainables.data import default_data_root

    try:
        per_class = tuple(int(x) for x in args.per_class.split(","))
    except ValueError:
        per_class = ()
    if len(per_class) != 3 or min(per_class) < 1:  # checked here, not by assert (gone under python -O)
        raise WbsweepError(f"--per-class {args.per_class!r}: write three positive counts, e.g. 500,100,100.")
    out = Path(args.out).expanduser() if args.out else default_data_root() / mini_imagenet.FOLDER
    info = mini_imagenet.prepare(args.imagenet_root, out, size=args.size, seed=args.seed, per_class=per_class,
                                 resize=args.resize)
    print(f"mini-imagenet: {info['counts']} images of {info['num_classes']} classes (train at {info['resize']} px, "
          f"val/test at {info['size']} px) in {out}; "
          f"use --data-root {out.parent} (datasets mini-imagenet, mini-imagenet-lt)")
    return 0


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    """Serve DIR's MLflow store for the UI and for sweeps logging over HTTP (--tracking-uri), the
    way cluster/a100.yaml does on the head node. Binds 127.0.0.1 unless --host says otherwise."""
    import shutil

    out = _out_dir(args.out, create=True)
    from orchestrator.tracking.tracker import default_tracking_uri, prepare_store

    mlflow = shutil.which("mlflow")
    if mlflow is None:
        raise WbsweepError("the `mlflow` command is not on PATH; reinstall wbsweep (pip install -e .).")
    # built whole here, not step by step by the server; the Default experiment's artifacts go
    # through the server, as in a store the server creates
    for note in prepare_store(default_tracking_uri(out), "mlflow-artifacts:/", home=out / "mlartifacts"):
        print(note, file=sys.stderr)
    cmd = [mlflow, "server", "--backend-store-uri", default_tracking_uri(out),
           "--artifacts-destination", str((out / "mlartifacts").resolve()),
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow server for {out} on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    os.execv(mlflow, cmd)
    return 0  # not reached


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.sweep.status import status_text

    sys.stdout.write(status_text(Path(args.out).expanduser()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from orchestrator.bench.command import run_bench

    return run_bench(args, _parse_set(args.set or []))


def cmd_list(args: argparse.Namespace) -> int:
    from orchestrator.spec.experiment import spec_names
    from trainables.data import dataset_names
    from trainables.methods import METHODS
    from trainables.models import model_names

    print("specs:    " + ", ".join(spec_names()))
    print("methods:  " + ", ".join(f"{m.name} ({m.label})" for m in METHODS.values()))
    print("datasets: " + ", ".join(dataset_names()))
    print("models:   " + ", ".join(model_names()))
    return 0
