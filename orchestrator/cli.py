"""The ``wbsweep`` command line.

    wbsweep run table4 [--preset P] [--out DIR] [--storage DIR|s3://...] [--data-root DIR] [--address ADDR]
                       [--tracking-uri URI]
    wbsweep report table4 [--out DIR] [--storage DIR|s3://...] [--format table|markdown|csv|latex]
                          [--claims [PATH]] [--paper]
    wbsweep train --method wd [--spec table4 --preset cpu] [--seed 0] [--set epochs=5] [--out DIR]
    wbsweep train --config DIR/runs/<hash>/seed<k>/config.json [--out DIR]
    wbsweep list
    wbsweep bench [--device cpu|cuda] [--model resnet32|mlp3] [--json]

A mistake of the user's (a typo in a name, a bad path, a malformed spec) prints one line saying
what is wrong and what to do, and exits with status 2; ``--debug`` shows the traceback instead.

Exit status: 0 done; 1 a sweep finished with failed trials; 2 a user error (one line); 3 the
sweep's watchdog stopped it (its Ray cluster is gone, or it made no progress: one line;
orchestrator/watchdog.py), and the same command resumes it; 130 interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import yaml

from orchestrator.yaml_loader import load as load_yaml
from trainables.errors import WbsweepError, exception_chain

DEFAULT_OUT = "wbsweep-out"


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
    from orchestrator.status import malformed_status
    from trainables import storage

    if arg:
        if storage.is_remote(arg):
            return arg
        arg = arg.removeprefix("file://")
        return str(_out_dir(arg, create=create, flag="--storage").resolve())
    recorded = []
    for f in sorted((out / "status").glob("*.json")) if out.is_dir() else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if malformed_status(doc):  # not a status file of ours: `wbsweep status` names it
            continue
        if spec is None or doc["spec"] == spec:
            recorded.append((doc["updated"], storage.recorded_storage(doc, f, out)))
    latest = max(recorded, key=lambda t: t[0])[1] if recorded else None
    return latest or str(out.resolve())


def _data_root(path: str | None) -> str | None:
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise WbsweepError(f"--data-root {root} is not a folder; point it at the folder that holds the datasets.")
    return str(root)


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.report import report
    from orchestrator.spec import load_experiments
    from orchestrator.sweep import Sweep, SweepOptions

    exps = load_experiments(args.spec, args.preset)  # one, or one per variant (dataset/model) of the preset
    exp = exps[0]
    if args.plan:  # stages, models, epochs, estimated device time and cost (orchestrator.cost)
        from orchestrator import cost

        return cost.plan_command(exps, args)
    out = _out_dir(args.out, create=True)
    from orchestrator.tracking import default_tracking_uri

    store = _storage(args.storage, out, create=True) if args.storage else str(out.resolve())
    opts = SweepOptions(
        out=out, tracking_uri=args.tracking_uri or default_tracking_uri(out), storage=store,
        data_root=_data_root(args.data_root),
        address=args.address, device=args.device, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, max_failures=args.max_failures,
        fuse=args.fuse,
        quiet=args.quiet,
    )
    started = time.time()
    failures = []
    sweeps = [Sweep(e, opts) for e in exps]  # every variant's preflight (data, resources) before any runs
    for exp, sweep in zip(exps, sweeps, strict=True):
        if len(exps) > 1 and not args.quiet:
            print(f"[variant {exp.variant}]", file=sys.stderr)
        sweep.run()
        failures += sweep.progress.failures
    from orchestrator.analyses import ensure_analyses  # models reused from elsewhere get theirs now

    ensure_analyses(store, exp.name, exp.preset, device=args.device, data_root=opts.data_root,
                    tracking_uri=opts.tracking_uri, log=lambda m: print(m, file=sys.stderr))
    minutes = (time.time() - started) / 60
    analyses = sorted({a for e in exps for a in e.train.get("analyses", [])})
    try:
        args_ = (out, exp.name, exp.preset)
        kw = dict(table=exp.paper_table, method_order=[m.method.name for m in exp.methods], title=exp.title,
                  layout=exp.layout, analyses=analyses, store=store)
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
    from orchestrator.report import report
    from orchestrator.spec import load_experiments

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
    if args.claims is not None or args.paper:
        return _report_claims(args, out, spec, table, unknown)
    try:
        text = report(out, spec, args.preset, args.format, table, order, title, layout=layout, analyses=analyses,
                      store=_storage(args.storage, out, spec))
    except WbsweepError:
        if unknown is not None:  # no rows and no such spec: say that (not "run it first")
            raise unknown from None
        raise
    sys.stdout.write(text)
    from orchestrator.tracking import default_tracking_uri

    store = _storage(args.storage, out, spec)
    uri = args.tracking_uri or (default_tracking_uri(out) if (out / "mlflow.db").exists() else None)
    _report_to_mlflow(uri, out, store, spec, args.preset, text,
                      lambda: text if args.format == "csv" else report(out, spec, args.preset, "csv", table, order,
                                                                       title, layout=layout, analyses=analyses,
                                                                       store=store))
    return 0


def _report_to_mlflow(uri: str | None, out: Path, store: str, spec: str, preset: str | None, text: str,
                      table_csv) -> None:
    """The spec-level MLflow run of the report (orchestrator/mlflow_views.py), where there is a store;
    ``table_csv()`` gives the report's table as CSV."""
    if not uri:
        return
    from orchestrator.mlflow_views import report_to_mlflow

    try:
        csv = table_csv()
    except WbsweepError:
        csv = None
    report_to_mlflow(uri, out, store, spec, preset, text, csv, log=lambda m: print(m, file=sys.stderr))


def _report_claims(args: argparse.Namespace, out: Path, spec: str, table: int | None,
                   unknown: WbsweepError | None) -> int:
    """`report SPEC --claims [PATH] [--paper]`: the claims file (default: claims/<spec>.yaml beside
    the spec) tested on the results and on the paper's numbers (orchestrator/claims.py)."""
    from orchestrator.claims import claims_report, default_path
    from orchestrator.spec import find_spec
    from orchestrator.tracking import default_tracking_uri

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
    sys.stdout.write(claims_report(out, spec, args.preset, path, args.format, paper_table=table, store=store,
                                   paper_only=paper, tracking_uri=uri))
    return 0


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


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_experiment
    from trainables.config import config_hash, resolve_config
    from trainables.datacache import dataset_fingerprint
    from trainables.methods import get_method, method_config
    from trainables.train import CHECKPOINT, load_metrics, train

    saved = None
    if args.config:
        if args.method:
            raise WbsweepError("give either --config (a saved run's config.json) or --method, not both.")
        saved, cfg = _saved_config(args.config)
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

        with threadpool_limits(int(full["threads"])) if full["threads"] else contextlib.nullcontext():
            metrics = train(cfg, out, report=show)
    summary = {k: metrics[k] for k in ("config_hash", "fdr_train", "fdr_test", "best_epoch", "train_seconds")}
    summary["la"] = {la: {k: r[k] for k in ("param", "val_acc", "many", "medium", "few", "avg")}
                     for la, r in metrics["la"].items()}
    print(json.dumps(summary, indent=2))
    if saved is not None:
        from trainables.train import load_metrics as saved_metrics

        before = saved_metrics(saved.parent)
        if before is not None:
            print(f"the saved run's metrics ({saved.parent / 'metrics.json'}): {reproduction(before, metrics)}",
                  file=sys.stderr)
    return 0


def reproduction(before: dict, after: dict) -> str:
    """Whether a re-run reproduced a saved run's metrics: "reproduced exactly", or which numbers
    differ, by how much, and why they may (a run trained fused with others rounds differently)."""
    diff = metric_differences(before, after)
    if not diff:
        return "reproduced exactly"
    text = f"differ in {', '.join(diff[:8])}" + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
    rel = largest_relative_difference(before, after)
    if rel is not None:
        text += f" (largest relative difference {rel:.2g})"
    k = int(before.get("fused_k") or 1)
    if k > 1:
        text += (f"; it was trained fused with {k - 1} other model(s) (trainables/fused.py), whose batched "
                 "arithmetic rounds differently: a run trained alone (resources fuse: off) re-runs bit for bit")
    return text


#: The numbers of a model that a re-run must reproduce (not its timings or where it ran).
REPRODUCED = ("fdr_train", "fdr_test", "objective", "best_epoch", "epochs", "config_hash")


def metric_differences(before: dict, after: dict) -> list[str]:
    """The metrics (``REPRODUCED`` and every LA variant's numbers) that differ between two runs of one config."""
    diff = [k for k in REPRODUCED if before.get(k) != after.get(k)]
    for la, r in before.get("la", {}).items():
        other = after.get("la", {}).get(la, {})
        diff += [f"{la}.{k}" for k in ("param", "val_acc", "many", "medium", "few", "avg", "acc_per_class")
                 if r.get(k) != other.get(k)]
    return diff


def largest_relative_difference(before: dict, after: dict) -> float | None:
    """max |a − b| / max(|a|, |b|) over the numbers :func:`metric_differences` compares."""
    pairs = [(before.get(k), after.get(k)) for k in ("fdr_train", "fdr_test", "objective")]
    for la, r in before.get("la", {}).items():
        other = after.get("la", {}).get(la, {})
        pairs += [(r.get(k), other.get(k)) for k in ("param", "val_acc", "many", "medium", "few", "avg")]
        pairs += list(zip(r.get("acc_per_class") or [], other.get("acc_per_class") or [], strict=False))
    rel = [abs(a - b) / max(abs(a), abs(b)) for a, b in pairs
           if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a != b]
    return max(rel) if rel else None


def _saved_config(path: str) -> tuple[Path, dict]:
    """(the config.json, its config) of a saved run: ``PATH/config.json`` or its folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise WbsweepError(f"--config {path}: no such file; give a run's config.json (DIR/runs/<hash>/seed<k>/"
                           "config.json) or its folder.")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WbsweepError(f"--config {p} is not readable JSON ({exc}); give a run's config.json.") from None
    if not isinstance(cfg, dict) or "dataset" not in cfg or "seed" not in cfg:
        raise WbsweepError(f"--config {p} is not a wbsweep run's config (a JSON object with dataset, seed, ...).")
    return p, cfg


def cmd_analyze(args: argparse.Namespace) -> int:
    from orchestrator.analyses import ensure_analyses
    from orchestrator.results import read_rows
    from orchestrator.tracking import default_tracking_uri
    from trainables.storage import join

    out = _out_dir(args.out, create=False)
    store = _storage(args.storage, out, args.spec)
    df = read_rows(join(store, "results"))
    specs = [args.spec] if args.spec else sorted(set(df["spec"]))
    if df.empty or not set(specs) & set(df["spec"]):
        raise WbsweepError(f"no results{' for spec ' + repr(args.spec) if args.spec else ''} in "
                           f"{join(store, 'results')}; run the spec first (`wbsweep run SPEC --out DIR`).")
    uri = args.tracking_uri or (default_tracking_uri(out) if (out / "mlflow.db").exists() else None)
    for spec in specs:
        counts = ensure_analyses(store, spec, args.preset, names=args.names, force=not args.missing, device=args.device,
                                 data_root=_data_root(args.data_root), tracking_uri=uri,
                                 log=lambda m: print(m, file=sys.stderr))
        skipped = f", {counts['skipped']} without a checkpoint" if counts["skipped"] else ""
        print(f"{spec}: {counts['analysed']} of {counts['models']} model(s) analysed, {counts['rows']} rows written "
              f"to {join(store, 'analyses')}{skipped}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from trainables import mini_imagenet
    from trainables.data import default_data_root

    try:
        per_class = tuple(int(x) for x in args.per_class.split(","))
        assert len(per_class) == 3 and min(per_class) >= 1
    except (ValueError, AssertionError):
        raise WbsweepError(f"--per-class {args.per_class!r}: write three positive counts, e.g. 500,100,100.") from None
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
    from orchestrator.tracking import default_tracking_uri, prepare_store

    mlflow = shutil.which("mlflow")
    if mlflow is None:
        raise WbsweepError("the `mlflow` command is not on PATH; reinstall wbsweep (pip install -e .).")
    # built whole here, not step by step by the server; the Default experiment's artifacts go
    # through the server, as in a store the server creates
    for note in prepare_store(default_tracking_uri(out), "mlflow-artifacts:/"):
        print(note, file=sys.stderr)
    cmd = [mlflow, "server", "--backend-store-uri", default_tracking_uri(out),
           "--artifacts-destination", str((out / "mlartifacts").resolve()),
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow server for {out} on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    os.execv(mlflow, cmd)
    return 0  # not reached


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.status import status_text

    sys.stdout.write(status_text(Path(args.out).expanduser()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from orchestrator.bench import run_bench

    return run_bench(args, _parse_set(args.set or []))


def cmd_list(args: argparse.Namespace) -> int:
    from orchestrator.spec import spec_names
    from trainables.data import dataset_names
    from trainables.methods import METHODS
    from trainables.models import model_names

    print("specs:    " + ", ".join(spec_names()))
    print("methods:  " + ", ".join(f"{m.name} ({m.label})" for m in METHODS.values()))
    print("datasets: " + ", ".join(dataset_names()))
    print("models:   " + ", ".join(model_names()))
    return 0


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
