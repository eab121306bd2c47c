"""Storage: a local (shared) folder or an object store, through the same functions.

The object store is a real S3 server on loopback (moto's), reached with the AWS variables a user
sets (``AWS_ENDPOINT_URL`` points at it), so pyarrow's own S3 client is what is tested. The same
checks run against both backends where they apply.
"""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest
from helpers import wbsweep, wbsweep_here

from orchestrator.record.results import read_rows, rows_for_run, write_rows
from trainables import storage
from trainables.config import resolve_config
from trainables.errors import WbsweepError

BUCKET = "wbsweep-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server with one bucket; the environment that points clients at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto is a test dependency: pip install -e .[test]")
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._filesystem.cache_clear()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._filesystem.cache_clear()


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    """A fresh storage location on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


def test_join_keeps_a_uris_options_and_joins_local_paths(tmp_path):
    uri = "s3://b/p?endpoint_override=h:9000&scheme=http"
    assert storage.join(uri, "runs", "x") == "s3://b/p/runs/x?endpoint_override=h:9000&scheme=http"
    assert storage.join("s3://b/p/", "runs") == "s3://b/p/runs"
    assert storage.join(str(tmp_path), "runs", "a") == str(tmp_path / "runs" / "a")
    assert storage.join(f"file://{tmp_path}", "runs") == str(tmp_path / "runs")
    assert storage.is_remote("s3://b") and storage.is_remote("gs://b/x")
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote("file:///tmp/x")


def test_run_dir_is_the_run_folder_locally_and_a_scratch_folder_for_an_object_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WBSWEEP_SCRATCH", str(tmp_path / "scratch"))
    assert storage.run_dir(str(tmp_path / "runs"), "abc", 3) == tmp_path / "runs" / "abc" / "seed3"
    remote = storage.run_dir("s3://b/p/runs", "abc", 3)
    assert remote.is_relative_to(tmp_path / "scratch") and remote.parts[-2:] == ("abc", "seed3")
    # two sweeps' storages never share a scratch folder
    assert storage.run_dir("s3://b/q/runs", "abc", 3) != remote


def test_files_round_trip(location):
    target = storage.join(location, "a", "x.json")
    assert storage.read_bytes(target) is None and storage.read_json_object(target) is None
    assert not storage.exists(storage.join(location, "a"))
    storage.write_bytes(target, b'{"k": 1}')
    storage.write_bytes(storage.join(location, "a", "y.bin"), b"\x00\x01")
    assert storage.read_json_object(target) == {"k": 1}
    assert storage.list_files(storage.join(location, "a")) == ["x.json", "y.bin"]
    assert storage.list_files(storage.join(location, "a"), ".json") == ["x.json"]
    assert storage.list_files(storage.join(location, "nothing")) == []
    storage.delete(target)
    storage.delete(target)  # deleting what is gone is not an error
    assert storage.list_files(storage.join(location, "a")) == ["y.bin"]


def test_run_folder_upload_and_download(location, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in {"model.pt": b"m" * 1000, "metrics.json": b"{}", ".model.pt.tmp": b"partial"}.items():
        (src / name).write_bytes(data)
    home = storage.join(location, "runs", "h", "seed0")
    sent = storage.upload(src, home)
    if not storage.is_remote(location):
        assert sent == []  # a local run folder is trained in place: nothing to copy
        return
    assert sent == ["model.pt", "metrics.json"]  # metrics.json (the 'finished' mark) last; no temporary file
    dst = tmp_path / "dst"
    assert sorted(storage.download(home, dst)) == ["metrics.json", "model.pt"]
    assert (dst / "model.pt").read_bytes() == b"m" * 1000
    assert storage.download(home, tmp_path / "one", ["model.pt", "absent"]) == ["model.pt"]
    storage.write_bytes(storage.join(home, "checkpoint.pt"), b"c")
    storage.finish_upload(src, home)
    assert "checkpoint.pt" not in storage.list_files(home) and not src.exists()


def _rows(seed: int) -> list[dict]:
    metrics = {"config_hash": "abc", "fdr_train": 1.0, "fdr_test": 2.0, "objective": 50.0, "epochs": 1,
               "best_epoch": 1, "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0, "few": 3.0, "avg": 2.0,
                               "acc_per_class": [2.0] * 10}}}
    cfg = {**resolve_config({"la": ["none"]}), "seed": seed}
    return rows_for_run(metrics, cfg, spec="table4", preset="smoke", method="wd", stage="repeat", mlflow_run_id=None,
                        versions={"wbsweep": "x", "torch": "x", "ray": "x"},
                        created_at=pd.Timestamp("2026-01-01", tz="UTC"))


def test_parquet_rows_on_each_backend(location):
    results = storage.join(location, "results")
    assert read_rows(results).empty
    write_rows(results, "a", _rows(0))
    write_rows(results, "b", _rows(1))
    df = read_rows(results)
    assert sorted(df["seed"]) == [0, 1] and set(df["fdr_test"]) == {2.0}
    # what users do: pandas over pyarrow's filesystem
    fs, path = storage.filesystem(results)
    assert len(pd.read_parquet(path, filesystem=fs)) == 2
    storage.write_bytes(storage.join(results, "torn.parquet"), b"PAR1 not really")
    with pytest.raises(WbsweepError, match="torn.parquet"):
        read_rows(results)


def test_a_missing_bucket_is_one_line_before_anything_runs(s3_env, tmp_path):
    with pytest.raises(WbsweepError, match="no-such-bucket"):
        storage.check_writable("s3://no-such-bucket/x")
    out = tmp_path / "out"
    proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(out), "--storage", "s3://no-such-bucket/sweep",
                   env={**os.environ, **s3_env}, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "no-such-bucket" in lines[0], proc.stderr[-2000:]
    assert not (out / "results").exists()


def test_an_unreachable_object_store_is_one_line(tmp_path, monkeypatch):
    """No S3 endpoint answers: `status` and `report` say so in one line (exit 2), no traceback."""
    for k, v in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}.items():
        monkeypatch.setenv(k, v)
    storage._filesystem.cache_clear()
    with pytest.raises(WbsweepError, match="s3://nowhere/x/results.*credentials"):
        storage.list_files("s3://nowhere/x/results")
    storage._filesystem.cache_clear()
    proc = wbsweep("report", "table4", "--out", str(tmp_path), "--storage", "s3://nowhere/x", timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "s3://nowhere/x" in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_a_sweep_on_s3_survives_crashes_and_loses_nothing(s3_env, tmp_path, smoke_sweep):
    """The whole smoke sweep with its results, model folders and Ray's state on S3, every seed-1
    trial's process killed once after its first epoch: the retries resume from the checkpoints in the
    bucket and the rows equal the uninterrupted local sweep's."""
    ref_out, ref_proc = smoke_sweep
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    store = f"s3://{BUCKET}/sweep"
    env = {**os.environ, **s3_env, "WBSWEEP_INJECT_CRASH": "1", "WBSWEEP_INJECT_CRASH_SEEDS": "1",
           "WBSWEEP_SCRATCH": str(scratch)}
    proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(out), "--storage", store, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    key = ["method", "la", "seed"]
    df = read_rows(storage.join(store, "results")).sort_values(key).reset_index(drop=True)
    ref = pd.read_parquet(ref_out / "results").sort_values(key).reset_index(drop=True)
    assert len(df) == 24 and df[key].equals(ref[key])
    compared = ["acc_avg", "acc_few", "fdr_train", "fdr_test", "tau", "gamma", "config_hash"]
    # rtol: fused models round as the group they train in does (see tests/test_resilience.assert_same_rows)
    pd.testing.assert_frame_equal(df[compared], ref[compared], check_exact=False, rtol=1e-3)
    assert not read_rows(storage.join(store, "trials")).empty

    # the bucket holds every model folder, finished (no checkpoint left) and trained twice (crash + retry)
    runs = storage.join(store, "runs")
    fs, runs_path = storage.filesystem(runs)
    from pyarrow.fs import FileSelector

    files = [i.path for i in fs.get_file_info(FileSelector(runs_path, recursive=True))]
    finished = [p.rsplit("/", 1)[0] for p in files if p.endswith("/metrics.json")]
    assert len(finished) >= 16
    assert not [p for p in files if p.endswith("/checkpoint.pt")]
    attempts = [len(storage.read_bytes(f"s3://{p}/attempts.log").splitlines()) for p in finished]
    # every seed-1 model crashed once and its retry resumed; a seed-0 model trained once, or twice when
    # it was fused with a seed-1 model (the group's process died with it)
    assert all(n == 2 if p.endswith("/seed1") else n in (1, 2) for p, n in zip(finished, attempts, strict=True)), \
        attempts
    assert attempts.count(2) >= 5 and attempts.count(1) >= 1
    assert any(p.startswith(f"{BUCKET}/sweep/ray/") for p in
               (i.path for i in fs.get_file_info(FileSelector(f"{BUCKET}/sweep", recursive=True))))
    # nothing of it on the driver's disk but its own files, no model folder left in the scratch
    assert not (out / "results").exists() and not (out / "runs").exists()
    assert not list(scratch.glob("*/*/seed*/metrics.json"))

    # MLflow (driver-local here) got every model's files, downloaded from the bucket
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("table4")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=500)
                if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("wbsweep.kind") != "reference"]
    assert children and all(r.info.status == "FINISHED" for r in children)
    assert len(list((out / "mlartifacts").rglob("model.pt"))) == len(children)

    # the models trained earlier in the sweep (a tune stage's own seed, reused by its repeat stage)
    # were found finished in the bucket and reused, as many as the local sweep reused: none trained
    # twice for want of finding it there. (A whole second run that trains nothing is not repeated here:
    # tests/test_integration.py's rerun test checks that on the same code path, whose storage calls
    # are the ones this test and test_parquet_rows_on_each_backend check on S3.)
    reused = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped ")]
    assert reused and reused == [ln for ln in ref_proc.stderr.splitlines() if ln.startswith("skipped ")], \
        (reused, ref_proc.stderr[-2000:])

    # report and status find the storage the run recorded
    rep = wbsweep("report", "table4", "--out", str(out), "--format", "csv", env=env, timeout=300)
    assert rep.returncode == 0 and len(rep.stdout.strip().splitlines()) == 13, rep.stderr[-2000:]

    # analyses from the checkpoints in the bucket, their numbers and files written back there
    an = wbsweep("analyze", "--out", str(out), "--spec", "table4", "--names", "weight_norms", env=env, timeout=600)
    assert an.returncode == 0 and "12 of 12 model(s) analysed" in an.stdout, an.stdout + an.stderr[-2000:]
    from orchestrator.record.analyses import read_analysis_rows

    rows = read_analysis_rows(storage.join(store, "analyses"))
    assert rows.groupby(["config_hash", "seed"]).ngroups == 12 and set(rows["analysis"]) == {"weight_norms"}
    assert all(storage.exists(storage.join(runs, h, f"seed{s}", "analysis.json"))
               for h, s in rows[["config_hash", "seed"]].drop_duplicates().itertuples(index=False))
    assert not list(scratch.glob("*/*/seed*"))  # the scratch copies are gone


def test_a_local_storage_folder_apart_from_out(tmp_path, capsys):
    """`report --storage DIR` reads the results there, not in --out (tests/test_cluster.py runs a
    whole two-node sweep with a shared --storage folder)."""
    out, shared = tmp_path / "out", tmp_path / "shared"
    out.mkdir()
    write_rows(storage.join(str(shared), "results"), "x", _rows(0))
    # hand-made rows (config hash "abc"): not a config the spec resolves to, so listed by --all-configs
    rep = wbsweep_here(capsys, "report", "table4", "--out", str(out), "--storage", str(shared), "--format", "csv",
                       "--all-configs")
    assert rep.returncode == 0 and "digits-lt,mlp3,wd,abc," in rep.stdout, rep.stderr[-2000:]
    missing = wbsweep_here(capsys, "report", "table4", "--out", str(out), "--format", "csv")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_recorded_storage_is_the_folder_itself_after_a_move_or_copy(tmp_path):
    """A status file's storage, seen from the --out folder it is in now."""
    out, shared = tmp_path / "out", tmp_path / "shared"
    (out / "status").mkdir(parents=True)
    (out / "results").mkdir()
    shared.mkdir()
    status = out / "status" / "table4-cpu.json"
    from orchestrator.sweep.status import recorded_storage as rec
    assert rec({"storage": None}, status, out) is None  # results in --out (what a sweep records now)
    assert rec({"storage": "s3://b/p"}, status, out) == "s3://b/p"
    assert rec({"storage": str(shared)}, status, out) == str(shared)  # a separate --storage folder
    assert rec({"storage": "/x/old", "out": "/x/old"}, status, out) is None
    # earlier versions recorded --out's own absolute path: a copy (the old folder still there, with
    # this status file) and a move (the old folder gone) both mean this folder's own results
    copied_from = tmp_path / "old"
    (copied_from / "status").mkdir(parents=True)
    (copied_from / "status" / status.name).write_text("{}")
    assert rec({"storage": str(copied_from)}, status, out) is None
    assert rec({"storage": str(tmp_path / "moved-away")}, status, out) is None


@pytest.mark.slow
def test_a_moved_results_folder_reports_its_own_rows(tmp_path, smoke_sweep, capsys):
    """`mv OUT NEW; wbsweep report --out NEW` reads NEW, also where the status files were written
    by an earlier version (storage = the old folder's absolute path), and `status` finds the seeds."""
    import json
    import shutil

    ref_out, _ = smoke_sweep
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(ref_out, old, ignore=shutil.ignore_patterns("ray"))
    for f in (old / "status").glob("*.json"):
        doc = json.loads(f.read_text())
        doc.pop("out", None)
        doc["storage"] = str(old.resolve())  # as earlier versions wrote it
        f.write_text(json.dumps(doc))
    old.rename(new)
    rep = wbsweep_here(capsys, "report", "table4", "--preset", "smoke", "--out", str(new), "--format", "csv")
    assert rep.returncode == 0 and len(rep.stdout.strip().splitlines()) == 13, rep.stderr[-2000:]


def test_a_torn_metrics_file_means_not_finished(tmp_path):
    """A zero-length or cut metrics.json (power loss) must not fail the sweep: the model is trained again."""
    from trainables.run_files import load_metrics
    from trainables.trial import finished_metrics

    folder = storage.run_dir(str(tmp_path), "abc", 0)
    folder.mkdir(parents=True)
    for torn in ("", '{"config_hash": "abc", "la"', "[]"):
        (folder / "metrics.json").write_text(torn)
        assert load_metrics(folder) is None and finished_metrics(str(tmp_path), "abc", 0) is None
    (folder / "metrics.json").write_text('{"config_hash": "abc"}')
    assert load_metrics(folder) == finished_metrics(str(tmp_path), "abc", 0) == {"config_hash": "abc"}
