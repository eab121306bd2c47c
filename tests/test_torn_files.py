"""A torn file (a truncated or empty copy: a full disk, a copy cut short, a power cut) that a
command reads is one line naming it and what to do, never a traceback: `analyze` names each torn
``model.pt`` and goes on with the other models (exit 1 at the end, with the count), and following
its advice trains the model again; a torn stage-1 model under `train --config`, a torn
``forgetting.npz``, a torn checkpoint (the model trains from its first epoch, said in one line) and
a torn saved ``metrics.json`` (nothing to compare) likewise. Real sweeps, real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import wbsweep

from orchestrator.cli import main
from orchestrator.record.results import read_rows
from trainables.errors import WbsweepError

SPEC = """name: tiny
methods:
  - {method: wd, la: [none]}
  - {method: wb, la: [none]}
presets:
  p:
    train: {dataset: digits-lt, model: mlp3, epochs: 2, lr: 0.01, width: 16}
    seeds: [0, 1, 2]
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, _shared_ray) -> Path:
    """A finished sweep of WD and WB (WB's stage 2 starts from WD's model.pt), three seeds each."""
    base = tmp_path_factory.mktemp("torn")
    (base / "tiny.yaml").write_text(SPEC)
    proc = wbsweep("run", str(base / "tiny.yaml"), "--preset", "p", "--out", str(base / "out"), "--address",
                   _shared_ray.address, env=_shared_ray.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base


def tear(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def model_folders(out: Path) -> list[tuple[str, Path]]:
    """(method, run folder) of each model, in the order `analyze` visits them."""
    rows = read_rows(out / "results").drop_duplicates(["config_hash", "seed"])
    return [(r.method, out / "runs" / r.config_hash / f"seed{r.seed}") for r in rows.itertuples()]


def test_analyze_names_each_torn_model_and_analyses_the_others(sweep, ray_cluster):
    out = sweep / "out"
    models = model_folders(out)
    assert len(models) == 6
    first, empty, torn_metrics = models[0][1], models[3][1], models[4][1]
    tear(first / "model.pt")  # the first model analyze visits: those after it must still be analysed
    (empty / "model.pt").write_bytes(b"")  # a power cut between create and write
    tear(torn_metrics / "metrics.json")  # not needed by analyze: the folder names the config hash
    proc = wbsweep("analyze", "--out", str(out), "--spec", "tiny", "--names", "weight_norms")
    err = proc.stderr
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "4 of 6 model(s) analysed" in proc.stdout and "2 not analysed" in proc.stdout, proc.stdout
    for folder in (first, empty):
        (line,) = [ln for ln in err.splitlines() if str(folder / "model.pt") in ln]
        assert "not analysed" in line and "is torn" in line and "run the spec again" in line, line
        assert not (folder / "analysis.json").exists()
    assert err.strip().splitlines()[-1].startswith("wbsweep: 2 model(s) could not be analysed")
    for _, folder in models:
        if folder not in (first, empty):
            assert (folder / "analysis.json").is_file(), folder

    # what each line says to do trains that model again; then every model is analysed
    for folder in (first, empty):
        line = next(ln for ln in err.splitlines() if str(folder / "model.pt") in ln)
        assert f"move {folder} away" in line
        pattern = Path(line.split(f"move {folder} away, delete ", 1)[1].split(" and run the spec again")[0])
        shutil.move(folder, sweep / f"away-{folder.parent.name}-{folder.name}")
        rows = list(pattern.parent.glob(pattern.name))
        assert len(rows) == 1  # this model's results file, no other
        rows[0].unlink()
    proc = wbsweep("run", str(sweep / "tiny.yaml"), "--preset", "p", "--out", str(out), "--address",
                   ray_cluster.address, env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = wbsweep("analyze", "--out", str(out), "--spec", "tiny", "--names", "weight_norms")
    assert proc.returncode == 0 and "6 of 6 model(s) analysed" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_a_torn_stage1_model_under_train_config_is_one_line(sweep, tmp_path, capsys):
    out = sweep / "out"
    stage2 = next(folder for method, folder in model_folders(out) if method == "wb")
    parent = tmp_path / "stage1" / "model.pt"
    parent.parent.mkdir()
    init_from = json.loads((stage2 / "config.json").read_text())["init_from"]
    shutil.copyfile(init_from, parent)
    tear(parent)
    code = main(["train", "--config", str(stage2 / "config.json"), "--set", f"init_from={parent}",
                 "--out", str(tmp_path / "o")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("wbsweep:")]
    assert code == 2 and len(lines) == 1, lines
    assert str(parent) in lines[0] and "is torn" in lines[0] and "stage-1 model" in lines[0]


def test_a_torn_saved_metrics_file_is_said_under_train_config(sweep, tmp_path, capsys):
    src = next(folder for method, folder in model_folders(sweep / "out") if method == "wd")
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copyfile(src / "config.json", saved / "config.json")
    shutil.copyfile(src / "metrics.json", saved / "metrics.json")
    tear(saved / "metrics.json")
    assert main(["train", "--config", str(saved / "config.json"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert f"({saved / 'metrics.json'}) are torn" in err and "Traceback" not in err, err


def test_a_torn_checkpoint_trains_from_the_first_epoch_and_says_so(tmp_path, capsys):
    args = ["train", "--method", "wd", "--set", "dataset=digits-lt", "--set", "model=mlp3", "--set", "width=16",
            "--set", "epochs=2", "--out", str(tmp_path)]
    assert main(args) == 0
    err = capsys.readouterr().err
    folder = Path(next(ln for ln in err.splitlines() if ln.startswith("model folder: ")).split(": ", 1)[1])
    (folder / "metrics.json").unlink()  # not finished, as after a crash
    shutil.copyfile(folder / "model.pt", folder / "checkpoint.pt")
    tear(folder / "checkpoint.pt")
    assert main(args) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "checkpoint.pt" in ln]
    assert str(folder / "checkpoint.pt") in line and "is torn" in line and "first epoch" in line
    assert (folder / "metrics.json").is_file()


def test_a_torn_forgetting_file_is_named(tmp_path):
    from trainables.analysis import run_analyses
    from trainables.train import train

    train({"dataset": "digits-lt", "model": "mlp3", "width": 16, "epochs": 2, "track_forgetting": True,
           "device": "cpu"}, tmp_path)
    tear(tmp_path / "forgetting.npz")
    with pytest.raises(WbsweepError) as err:
        run_analyses(tmp_path, ["forgetting"], plots=False)
    assert str(tmp_path / "forgetting.npz") in str(err.value) and "\n" not in str(err.value)
    assert os.path.exists(tmp_path / "model.pt")


def test_a_torn_rows_file_is_named_and_written_again_as_it_says(sweep, ray_cluster):
    """A torn Parquet file of results/ (or analyses/) stops `report` (or `analyze`) in one line naming
    it; moved away, the next `run` (`analyze --missing`) writes its rows again, training nothing."""
    out = sweep / "out"
    for kind, command, again in (("results", ["report", str(sweep / "tiny.yaml"), "--out", str(out), "--preset", "p"],
                                  ["run", str(sweep / "tiny.yaml"), "--preset", "p", "--out", str(out),
                                   "--address", ray_cluster.address]),
                                 ("analyses", ["analyze", "--out", str(out), "--spec", "tiny", "--names",
                                               "weight_norms", "--missing"], None)):
        if kind == "analyses":
            assert wbsweep(*command).returncode == 0  # the rows exist (written by the first test, or here)
        files = sorted((out / kind).glob("*.parquet"))
        assert files, kind
        tear(files[0])
        proc = wbsweep(*command)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and str(files[0]) in lines[0], proc.stderr[-2000:]
        assert "is torn" in lines[0] and "writes its rows again" in lines[0], lines[0]
        shutil.move(files[0], sweep / f"torn-{kind}.parquet")
        proc = wbsweep(*(again or command), env=ray_cluster.env if again else None)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert files[0].is_file()  # written again
        if again:
            assert "trials 6/6 done (6 reused)" in proc.stderr  # nothing trained
