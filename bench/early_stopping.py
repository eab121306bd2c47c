"""The same search with and without early stopping (ASHA), over search seeds: epochs trained, wall
time, the chosen configurations and their validation and test accuracy.

    python bench/early_stopping.py [--spec table4] [--preset cpu] [--seeds 0,1,2]
                                   [--datasets digits-lt,fashion-mnist-lt] [--out DIR] [--json-out FILE]

Each search seed s runs the preset with ``seeds: [s]`` (the search's seed is the preset's first seed,
and the one repeat seed is the chosen trial's own model, so the repeat stage trains nothing new),
once with ``search_scheduler: none`` and once with the ASHA settings given (default: the
orchestrator's defaults), each in a fresh folder through ``wbsweep run`` (a real local Ray cluster).
A dataset that is not installed is skipped with a line. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dataset_available(name: str) -> bool:
    from trainables.data import load_dataset

    try:
        load_dataset(name, download=False)
        return True
    except Exception as exc:  # not installed here
        print(f"skipping {name}: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
        return False


def write_spec(spec: str, preset: str, dataset: str, seed: int, scheduler, folder: Path) -> Path:
    from orchestrator.spec.experiment import find_spec

    doc = yaml.safe_load(find_spec(spec).read_text())
    p = doc["presets"][preset]
    p["seeds"] = [seed]
    p["search_scheduler"] = scheduler
    p.setdefault("train", {})["dataset"] = dataset
    doc["name"] = f"{doc['name']}_es"
    path = folder / f"spec-{dataset}-{seed}-{json.dumps(scheduler, sort_keys=True).replace(' ', '')}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def summarize(out: Path, seed: int) -> dict:
    trials = pd.read_parquet(out / "trials")
    results = pd.read_parquet(out / "results")
    models = trials.drop_duplicates(["config_hash", "seed"])
    pruned = models["pruned"].fillna(False).astype(bool)
    epochs = int(models["epochs"].sum())
    full = int(sum(models["epochs"][~pruned])) + int(sum(
        json.loads(c).get("stage2_epochs" if json.loads(c).get("stage2") else "epochs", 0)
        for c in models["config"][pruned]))
    methods = {}
    for stage in sorted(out.glob("stages/tune-*.json")):
        rec = json.loads(stage.read_text())
        method = stage.name.split("-")[1]
        rows = results[(results["method"] == method) & (results["seed"] == seed)]
        best_la = rows.loc[rows["val_acc"].idxmax()] if len(rows) else None
        methods[method] = {
            "chosen": rec["searched"], "val_objective": round(rec["objective"], 2),
            "la": None if best_la is None else best_la["la"],
            "test_acc": None if best_la is None else round(float(best_la["acc_avg"]), 2),
            "test_acc_none": round(float(rows[rows["la"] == "none"]["acc_avg"].iloc[0]), 2) if len(rows) else None,
        }
    status = json.loads(next(out.glob("status/*.json")).read_text())
    return {"sweep_s": round(status["updated"] - status["started"], 1), "trials": len(models),
            "pruned": int(pruned.sum()), "epochs_trained": epochs,
            "epochs_without_pruning": full, "methods": methods}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="table4")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="digits-lt,fashion-mnist-lt")
    ap.add_argument("--grace-period", type=int)
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--out", default="/tmp/wbsweep-bench-es")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    asha = {"name": "asha", "reduction_factor": args.reduction_factor}
    if args.grace_period:
        asha["grace_period"] = args.grace_period
    runs = []
    for dataset in args.datasets.split(","):
        if not dataset_available(dataset):
            continue
        for seed in [int(s) for s in args.seeds.split(",")]:
            label = f"asha-g{args.grace_period or 'auto'}-rf{args.reduction_factor:g}"
            for mode, scheduler in (("none", "none"), ("asha", asha)):
                out = folder / f"{dataset}-{seed}-{mode if mode == 'none' else label}"
                if not (out / "stages").is_dir():
                    spec = write_spec(args.spec, args.preset, dataset, seed, scheduler, folder)
                    t0 = time.time()
                    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--preset",
                                           args.preset, "--out", str(out), "--device", "cpu", "--quiet"],
                                          capture_output=True, text=True, cwd=ROOT)
                    wall = time.time() - t0
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    (out / "wall_s").write_text(f"{wall:.1f}")
                wall = float((out / "wall_s").read_text())
                row = {"dataset": dataset, "seed": seed, "mode": mode, "wall_s": wall, **summarize(out, seed)}
                print(json.dumps(row), flush=True)
                runs.append(row)
    print_summary(runs)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"asha": asha, "runs": runs}, indent=2))
    return 0


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def print_summary(runs: list[dict]) -> None:
    for dataset in sorted({r["dataset"] for r in runs}):
        rs = [r for r in runs if r["dataset"] == dataset]
        print(f"\n{dataset}: {len({r['seed'] for r in rs})} search seeds")
        for mode in ("none", "asha"):
            m = [r for r in rs if r["mode"] == mode]
            print(f"  {mode:5s} epochs {_ms([r['epochs_trained'] for r in m])} of {m[0]['epochs_without_pruning']}, "
                  f"pruned {_ms([r['pruned'] for r in m])} of {m[0]['trials']} trials, "
                  f"wall {_ms([r['wall_s'] for r in m])} s (the sweep itself {_ms([r['sweep_s'] for r in m])} s)")
        print(f"  {'method':10s} {'full: val':>10s} {'test':>12s} | {'asha: val':>10s} {'test':>12s} | same choice")
        for method in rs[0]["methods"]:
            cols = []
            for mode in ("none", "asha"):
                m = [r["methods"][method] for r in rs if r["mode"] == mode]
                cols += [_ms([x["val_objective"] for x in m]), _ms([x["test_acc"] for x in m])]
            same = sum(a["methods"][method]["chosen"] == b["methods"][method]["chosen"]
                       for a in rs if a["mode"] == "none" for b in rs if b["mode"] == "asha" and b["seed"] == a["seed"])
            print(f"  {method:10s} {cols[0]:>10s} {cols[1]:>12s} | {cols[2]:>10s} {cols[3]:>12s} | {same}/{len(m)}")


if __name__ == "__main__":
    sys.exit(main())
