"""Cluster launcher configs must validate against the schema that Ray itself ships."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import ray
import yaml
from helpers import CLI, kill_tree, long_trials_spec, wbsweep

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_config_is_valid_for_ray(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    # what wbsweep relies on: the project is installed on every node
    assert any("pip install" in c and "wbsweep" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_config_is_valid_once_ray_up_fills_its_defaults(path):
    """What `ray up` does before launching: Ray's defaults merged in, then Ray's own validation."""
    from ray.autoscaler._private.util import validate_config
    from ray.autoscaler.sdk import fillout_defaults

    config = fillout_defaults(yaml.safe_load(path.read_text()))
    validate_config(config)
    assert any("pip install" in c and "wbsweep" in c for c in config["setup_commands"])


def test_a100_workers_start_on_demand_and_declare_their_gpus():
    from ray.autoscaler.sdk import fillout_defaults

    from orchestrator.sweep.cluster import ClusterShape, check_trial_fits, node_types_of_config, pending_trials

    config = fillout_defaults(yaml.safe_load((CLUSTER / "a100.yaml").read_text()))
    a100 = config["available_node_types"]["a100"]
    assert a100["min_workers"] == 0 and a100["resources"]["GPU"] == 8
    types, cap = node_types_of_config(config)
    shape = ClusterShape(True, types, "a100.yaml", cap)
    check_trial_fits(shape, cpus=4, gpus=1, local=False)  # no live GPU, yet a trial the workers hold: no error
    assert pending_trials(shape, 4, 1, None) == 32  # four 8-GPU workers at most
    assert pending_trials(shape, 4, 0.25, None) == 96  # 24 CPU-bound trials per node (96 CPUs / 4)
    assert pending_trials(shape, 4, 1, 6) == 6  # --max-concurrent caps it


def test_schema_rejects_a_broken_config():
    config = yaml.safe_load((CLUSTER / "a100.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


# --- a real two-node Ray cluster on loopback, and the MLflow server -------------------------------


@pytest.fixture()
def two_node_cluster(tmp_path):
    # The session folder is named in every process of this cluster (for the clean-up); short,
    # because Ray's socket paths under it must fit in 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="wbray", dir="/tmp"))
    port = 6400 + os.getpid() % 500
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    head = ["ray", "start", "--head", f"--port={port}", "--num-cpus=1", '--resources={"node_a": 1}',
            "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    worker = ["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"node_b": 1}',
              "--disable-usage-stats"]
    # Token authentication (on by default for local Ray clusters since 2.59) needs a token on disk
    # before `ray start`; this creates ~/.ray/auth_token only where none exists.
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    try:
        for cmd in (head, worker):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        kill_tree(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_sweep_spreads_over_two_nodes_and_completes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    out = tmp_path / "driver"  # the driver's own files: status, Optuna's study, MLflow's store
    shared = tmp_path / "shared"  # stands in for the filesystem every node mounts (--storage)
    spec = tmp_path / "twonode.yaml"
    # two trials at once, one per node, of up to two fused models each (groups over a shared storage)
    spec.write_text(long_trials_spec("twonode", 300, fuse="2"))
    proc = wbsweep("run", str(spec), "--address", address, "--out", str(out), "--storage", str(shared),
                   "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # naive: 3 seeds; wd: 2 tune trials (one of them is seed 0) + seeds 1 and 2
    assert not (out / "results").exists() and len(list((shared / "runs").glob("*/seed*/model.pt"))) == 7
    df = pd.read_parquet(shared / "results")
    assert len(df) == 9 and not df.duplicated(["method", "la", "seed"]).any()
    assert df["ray_node_id"].nunique() == 2, "every trial ran on one node"


@pytest.mark.slow
def test_mlflow_server_binds_loopback_and_receives_a_sweep(tmp_path, ray_cluster):
    port = 5100 + os.getpid() % 500
    out = tmp_path / "out"
    server = subprocess.Popen([*CLI, "mlflow-server", "--out", str(out), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the MLflow server did not answer on 127.0.0.1")
        # bound to loopback only: the machine's other address does not answer
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
        uri = f"http://127.0.0.1:{port}"
        proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(out), "--tracking-uri", uri,
                       "--address", ray_cluster.address, env=ray_cluster.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("table4")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags
                    and r.data.tags.get("wbsweep.kind") != "reference"]
        assert len(children) == len(list((out / "runs").glob("*/seed*/metrics.json")))
        arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
        assert {"model.pt", "logits.npz", "config.json"} <= arts  # uploaded through the server
    finally:
        os.killpg(server.pid, 9)
