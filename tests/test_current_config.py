"""The table shows the configs the spec resolves to now, by config hash, whatever was written when
(issue #23, items 1 and 11).

One real sweep history, three `wbsweep run`s through a local Ray cluster: the spec as written (wd
5e-3), an edit (wd 0.5: the models collapse to 10 % average accuracy), the edit reverted (nothing new
is trained: every model is in results/). The reverted run's table, `report`, `report --claims` must
show the first run's numbers (before: the edit's, written last); rows of the abandoned config copied
from another machine with a later created_at must not win; `report --all-configs` lists both; and
`run --plan` counts a model as finished only where its config hash is (before: by method name, so
a spec with other epochs said "0 models to train").

The spec has a fixed first stage (wd), a second stage (wb: its parent's hash in its config) and a
tuned method (wd_fr_etf: its config from the choice its tune stage recorded in DIR/stages).
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import wbsweep

from orchestrator.record.results import SCHEMA, read_rows

pytestmark = pytest.mark.slow

SPEC = """name: revert
methods:
  - {{method: wd, la: [none]}}
  - {{method: wb, la: [none]}}
  - {{method: wd_fr_etf, la: [none]}}
presets:
  p:
    train: {{dataset: digits-lt, model: mlp3, epochs: {epochs}, stage2_epochs: 1, lr: 0.05, width: 16, select: last}}
    hyper: {{wd: {wd}, fr: 1.0e-2, stage2_wd: {stage2_wd}}}
    search: {{fr: {{loguniform: [1.0e-3, 1.0e-1]}}}}
    trials: 2
    seeds: [0, 1]
    resources: {{fuse: "off"}}
"""
CLAIMS = """min_seeds: 2
claims:
  - {name: wb_beats_wd, metric: acc_avg, greater: {method: wb}, than: {method: wd}}
"""


def write_spec(path: Path, wd: str = "5.0e-3", epochs: int = 2, stage2_wd: str = "0.1") -> str:
    path.write_text(SPEC.format(wd=wd, epochs=epochs, stage2_wd=stage2_wd))
    return str(path)


def table(stdout: str) -> list[str]:
    """The printed accuracy table's rows (method lines), as text."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "accuracy in %" in line)
    rows = []
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith(("NOTE", "WARNING", "report logged")):
            break
        rows.append(line)
    return rows


@pytest.fixture(scope="module")
def history(tmp_path_factory, _shared_ray) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("revert")
    spec, out = d / "revert.yaml", d / "out"
    runs = {}
    for name, wd in (("first", "5.0e-3"), ("edited", "0.5"), ("reverted", "5.0e-3")):
        write_spec(spec, wd)
        proc = wbsweep("run", str(spec), "--out", str(out), "--quiet", "--address", _shared_ray.address,
                       env=_shared_ray.env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = SimpleNamespace(proc=proc, rows=read_rows(out / "results"))
    first = set(runs["first"].rows["config_hash"])
    return SimpleNamespace(dir=d, spec=str(spec), out=out, runs=runs, first=first)


def means(rows: pd.DataFrame, hashes: set[str]) -> dict[str, float]:
    """Average accuracy per method over the rows of ``hashes``, computed from the Parquet rows."""
    sel = rows[rows["config_hash"].isin(hashes) & (rows["la"] == "none")]
    return sel.groupby("method")["acc_avg"].mean().to_dict()


def test_the_reverted_spec_shows_the_reverted_configs_numbers(history) -> None:
    first, edited, reverted = (history.runs[k] for k in ("first", "edited", "reverted"))
    assert len(reverted.rows) == len(edited.rows)  # nothing trained again: every model was in results/
    assert set(edited.rows["config_hash"]) - history.first  # the edit trained other configs
    assert means(edited.rows, set(edited.rows["config_hash"]) - history.first) != means(first.rows, history.first)
    assert table(reverted.proc.stdout) == table(first.proc.stdout)
    assert table(edited.proc.stdout) != table(first.proc.stdout)


def test_report_and_claims_show_the_current_configs(history, tmp_path: Path) -> None:
    rows = history.runs["reverted"].rows
    proc = wbsweep("report", history.spec, "--out", str(history.out))
    assert proc.returncode == 0, proc.stderr
    assert table(proc.stdout) == table(history.runs["first"].proc.stdout)
    csv = wbsweep("report", history.spec, "--out", str(history.out), "--format", "csv")
    shown = pd.read_csv(io.StringIO(csv.stdout)).set_index("method")["acc_avg_mean"].to_dict()
    assert shown == pytest.approx(means(rows, history.first))
    claims = tmp_path / "claims.yaml"
    claims.write_text(CLAIMS)
    proc = wbsweep("report", history.spec, "--out", str(history.out), "--claims", str(claims), "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    got = pd.read_csv(io.StringIO(proc.stdout)).iloc[0]
    want = means(rows, history.first)
    assert (got["mean_a"], got["mean_b"]) == pytest.approx((want["wb"], want["wd"]))


def test_rows_copied_from_another_machine_with_a_later_time_do_not_win(history, tmp_path: Path) -> None:
    """The abandoned config's rows, as another machine (or a clock set ahead) wrote them: later
    created_at, another node. The report still shows the config the spec asks for."""
    out = tmp_path / "out"
    shutil.copytree(history.out / "results", out / "results")
    shutil.copytree(history.out / "stages", out / "stages")
    rows = read_rows(out / "results")
    abandoned = rows[~rows["config_hash"].isin(history.first)].copy()
    abandoned["created_at"] = pd.Timestamp("2100-01-01", tz="UTC")
    abandoned["node"] = "elsewhere"
    for (method, hash_, seed), g in abandoned.groupby(["method", "config_hash", "seed"]):
        pq.write_table(pa.Table.from_pandas(g, schema=SCHEMA, preserve_index=False),
                       out / "results" / f"copied-{method}-{hash_}-s{seed}.parquet")
    proc = wbsweep("report", history.spec, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert table(proc.stdout) == table(history.runs["first"].proc.stdout)


def test_a_method_without_rows_for_its_current_config_is_said_not_replaced(history, tmp_path: Path) -> None:
    """WB with another stage2_wd: its row is dashes and a note says why; the others are shown. A
    spec none of whose configs has rows is refused in one line (exit 2)."""
    spec = write_spec(tmp_path / "revert.yaml", stage2_wd="0.3")
    proc = wbsweep("report", spec, "--out", str(history.out))
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    first = table(history.runs["first"].proc.stdout)
    assert [r for r in rows if not r.startswith("WB")] == [r for r in first if not r.startswith("WB")]
    assert re.match(r"WB\s+-(\s+-){6}\s+0$", next(r for r in rows if r.startswith("WB")))
    assert re.search(r"NOTE WB: no rows yet for the config the spec asks for now \(config hash [0-9a-f]{16}\)",
                     proc.stdout)
    assert "--all-configs` lists the 2 other config(s)" in proc.stdout
    spec = write_spec(tmp_path / "revert.yaml", wd="0.05")
    proc = wbsweep("report", spec, "--out", str(history.out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no rows of revert/p for the configs" in proc.stderr


def test_all_configs_lists_every_config_the_folder_holds(history) -> None:
    proc = wbsweep("report", history.spec, "--out", str(history.out), "--all-configs", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    listed = pd.read_csv(io.StringIO(proc.stdout), keep_default_na=False)
    rows = history.runs["reverted"].rows
    assert len(listed) == rows[["method", "config_hash"]].drop_duplicates().shape[0] == 6
    assert set(listed.loc[listed["current"] == "yes", "config_hash"]) == history.first
    other = listed[(listed["method"] == "wd") & (listed["current"] != "yes")].iloc[0]
    assert other["differs"] == "wd 0.5 (now 0.005)" and other["seeds"] == "0,1"
    text = wbsweep("report", history.spec, "--out", str(history.out), "--all-configs").stdout
    assert "every config this folder holds" in text and "wd 0.5 (now 0.005)" in text


def plan_left(spec: str, out: Path) -> int:
    proc = wbsweep("run", spec, "--plan", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(re.search(r"(\d+) models to train", proc.stdout).group(1))


def test_plan_counts_only_the_models_of_the_current_config_hashes(history, tmp_path: Path) -> None:
    """Unchanged spec: nothing to train. Other epochs: every model (2 search trials, 2 + 2 seeds of wd
    and wb, 1 seed of wd_fr_etf: its seed 0 is the chosen trial's own). The edit (wd 0.5) was
    trained by the second run: nothing."""
    assert plan_left(history.spec, history.out) == 0
    assert plan_left(write_spec(tmp_path / "revert.yaml", epochs=3), history.out) == 7
    assert plan_left(write_spec(tmp_path / "revert.yaml", wd="0.5"), history.out) == 0
