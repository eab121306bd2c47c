"""The documented cluster path on a real autoscaling Ray cluster, without cloud or GPU.

Ray's fake multi-node provider (the one ``ray.cluster_utils.AutoscalingCluster`` drives) plays the
cloud: a head with no CPU or GPU for trials and a ``gpu_worker`` node type with ``min_workers: 0``
that advertises a GPU; the autoscaler starts such workers as processes on this machine when trials
ask for them. Trials ask for 1 CPU + 1 GPU and train with ``--device cpu``, so no real GPU is
needed. ``AutoscalingCluster`` itself is not used: its ``start`` runs ``ray stop --force`` (every
Ray cluster on the machine) and its config template is not in Ray's wheel, so the fixture writes
the same config and starts the head in its own temp folder, which it alone cleans up.

Real Optuna, MLflow (SQLite) and Parquet throughout; one cluster for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from helpers import CLI, kill_tree, long_trials_spec

pytestmark = pytest.mark.slow

WORKER = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}
# Trials long enough (300 epochs, ~6 s) for a trial to be running when the next worker joins and for a
# worker to be killed under one.
SPEC = long_trials_spec("autoscale", 300)
KEY = ["method", "la", "seed"]
COMPARED = ["config_hash", "acc_many", "acc_medium", "acc_few", "acc_avg", "fdr_train", "fdr_test"]
SWEEP_TIMEOUT = 420  # a broken autoscaler fails the test instead of hanging CI


def fake_cluster_config(ip: str, port: int) -> dict:
    """An autoscaling config for Ray's fake multi-node provider (what ray-project's example.yaml has)."""
    return {
        "cluster_name": "wbsweep-fake", "max_workers": WORKER["max_workers"], "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": WORKER,
        },
        "head_node_type": "ray.head.default", "docker": {}, "auth": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    address: str
    env: dict
    temp: Path

    def raylets(self) -> dict[str, int]:
        """Ray node id -> pid of its raylet, for the live nodes of this cluster."""
        found = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                if args and args[0].endswith("raylet/raylet") and f"--temp_dir={self.temp}" in args:
                    node = next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), None)
                    if node:
                        found[node] = int(proc.name)
        return found

    def kill_node(self, node_id: str) -> None:
        """A worker node lost (spot reclaim): its raylet and every process under it, SIGKILL."""
        kill_tree(f"--node_id={node_id}")


@pytest.fixture(scope="module")
def cluster():
    import ray._private.services as services

    temp = Path(tempfile.mkdtemp(prefix="wbas", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = 6900 + os.getpid() % 500
    ip = services.get_node_ip_address()
    config = temp / "autoscaling.json"
    config.write_text(json.dumps(fake_cluster_config(ip, port)))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    try:
        proc = subprocess.run(["ray", "start", "--head", f"--port={port}", f"--autoscaling-config={config}",
                               "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}",
                               "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        yield FakeCluster(f"{ip}:{port}", env, temp)
    finally:
        kill_tree(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def sweep_cmd(cluster: FakeCluster, spec: Path, out: Path, *flags: str) -> list[str]:
    return [*CLI, "run", str(spec), "--address", cluster.address, "--out",
            str(out), "--device", "cpu", "--cpus-per-trial", "1", "--gpus-per-trial", "1", *flags]


def trained_models(out: Path) -> pd.DataFrame:
    """One row per trained model: when its first attempt started, when it finished, its attempts and node."""
    rows = []
    for metrics in (out / "runs").glob("*/seed*/metrics.json"):
        folder = metrics.parent
        starts = [float(ln.split()[0]) for ln in (folder / "attempts.log").read_text().splitlines()]
        rows.append({"model": f"{folder.parent.name}/{folder.name}", "start": min(starts),
                     "end": metrics.stat().st_mtime, "attempts": len(starts),
                     "node": (folder / "ray_node_id").read_text().strip()})
    return pd.DataFrame(rows)


def in_flight(models: pd.DataFrame, t: float) -> int:
    return int(((models["start"] <= t) & (models["end"] > t)).sum())


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "autoscale.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def from_zero(cluster, spec, tmp_path_factory):
    """One sweep of GPU trials on the cluster with no worker: (out, stderr, start time, node counts
    over time as [(seconds since start, live nodes)])."""
    out = tmp_path_factory.mktemp("from-zero")
    assert len(cluster.raylets()) == 1  # the head only
    started = time.time()
    proc = subprocess.Popen(sweep_cmd(cluster, spec, out), env={**cluster.env, "WBSWEEP_WAIT_NOTE_S": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nodes = []
    while proc.poll() is None and time.time() - started < SWEEP_TIMEOUT:
        nodes.append((time.time() - started, len(cluster.raylets())))
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-4000:]
    return out, stdout + err, started, nodes


def test_gpu_trials_start_with_zero_workers_and_the_autoscaler_adds_them(from_zero):
    out, err, started, nodes = from_zero
    df = pd.read_parquet(out / "results")
    assert len(df) == 9 and not df.duplicated(KEY).any()  # naive 3 seeds x 1 LA, wd 3 seeds x 2 LA
    assert df["ray_node_id"].nunique() >= 2, "every model was trained on one worker"
    models = trained_models(out)
    assert len(models) == 7 and (models["attempts"] == 1).all()  # naive 3, wd: 2 tune trials (one is seed 0) + 2
    # the user saw why the sweep waited: our line, and the autoscaler's own events
    assert "waiting for resources:" in err and "pending" in err, err[-3000:]
    # what our line says of the autoscaler depends on timing ("starting 1 gpu_worker" while Ray
    # launches one, "asked for nodes" before or after): both name it
    assert "; autoscaler: " in err and "Adding" in err and "gpu_worker" in err, err[-3000:]
    first_worker = min(t for t, n in nodes if n >= 2)
    print(f"\ntime to first worker {first_worker:.1f} s; first trial started "
          f"{models['start'].min() - started:.1f} s after the command; "
          f"live nodes over time: {[(round(t), n) for t, n in nodes[::4]]}")


def test_trials_in_flight_rise_as_workers_join(from_zero):
    """At the start no node holds a trial (the head has no GPU): the old fixed concurrency limit was
    computed from that. Here more trials run at once than one worker holds."""
    out, _, started, nodes = from_zero
    models = trained_models(out)
    moments = sorted(set(models["start"]) | set(models["end"]))
    timeline = [(round(t - started, 1), in_flight(models, t)) for t in moments]
    print(f"\ntrials in flight over time (s since the command, trials): {timeline}")
    assert max(n for _, n in timeline) >= 2, timeline
    assert max(n for _, n in nodes) >= 3, nodes  # head + at least two workers


def test_a_worker_killed_mid_sweep_costs_only_its_trial(cluster, spec, from_zero, tmp_path):
    reference = pd.read_parquet(from_zero[0] / "results").sort_values(KEY).reset_index(drop=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(sweep_cmd(cluster, spec, out), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # a model mid-training (a checkpoint written, not finished) on a worker: kill that worker
        victim = None
        deadline = time.time() + SWEEP_TIMEOUT / 2
        while victim is None and time.time() < deadline and proc.poll() is None:
            for folder in (out / "runs").glob("*/seed*"):
                if (folder / "checkpoint.pt").exists() and not (folder / "metrics.json").exists() \
                        and (folder / "ray_node_id").exists():
                    victim = folder, (folder / "ray_node_id").read_text().strip()
                    break
            time.sleep(0.1)
        assert victim is not None, "no trial was caught mid-training"
        folder, node = victim
        assert node in cluster.raylets(), "the trial is not on a live worker"
        finished_before = {p.parent for p in (out / "runs").glob("*/seed*/metrics.json")}
        cluster.kill_node(node)
        _, err = proc.communicate(timeout=SWEEP_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    assert node not in cluster.raylets()
    df = pd.read_parquet(out / "results").sort_values(KEY).reset_index(drop=True)
    assert not df.duplicated(KEY).any() and df[KEY].equals(reference[KEY])  # nothing lost, nothing twice
    pd.testing.assert_frame_equal(df[KEY + COMPARED], reference[KEY + COMPARED], check_exact=False, rtol=1e-9)
    models = trained_models(out).set_index("model")
    victim_key = f"{folder.parent.name}/{folder.name}"
    assert models.loc[victim_key, "attempts"] == 2  # retried, resumed from its checkpoint elsewhere
    assert models.loc[victim_key, "node"] != node
    for done in finished_before:  # finished work was not trained again
        assert models.loc[f"{done.parent.name}/{done.name}", "attempts"] == 1
    assert (models.drop(victim_key)["attempts"] <= 2).all()  # at most the trials on the lost node were retried
    assert "RETRY" in err


def test_a_trial_no_node_type_can_hold_is_one_line_and_nothing_is_written(cluster, spec, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(sweep_cmd(cluster, spec, out)[:-1] + ["2"], env=cluster.env, capture_output=True,
                          text=True, timeout=180)  # --gpus-per-trial 2: the GPU workers have 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "(autoscaler" not in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("wbsweep: error: ") and "gpu_worker" in lines[0] and "ray.head.default" in lines[0]
    assert "--gpus-per-trial 1" in lines[0]
    assert not any((out / d).exists() for d in ("results", "runs", "status", "trials"))
