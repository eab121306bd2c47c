"""What a sweep refuses before it runs on a cluster, and how many trials it keeps pending (no Ray
cluster needed: the shapes are what orchestrator.sweep.cluster reads from an autoscaler's config or the
live nodes)."""

from __future__ import annotations

import pytest

from orchestrator.sweep.cluster import ClusterShape, NodeType, check_trial_fits, pending_trials
from trainables.errors import WbsweepError
from trainables.trial import TrialWarnings, check_gpu_usable

CPU_ONLY = ClusterShape(True, [NodeType("head", {"CPU": 8}), NodeType("cpu16", {"CPU": 16}, 10)], "cpu.yaml", 10)
GPU = ClusterShape(True, [NodeType("head", {"CPU": 0}), NodeType("a100", {"CPU": 96, "GPU": 8}, 4)], "a100.yaml", 4)


def refusal(shape: ClusterShape, cpus: float, gpus: float, local: bool = False) -> str:
    with pytest.raises(WbsweepError) as info:
        check_trial_fits(shape, cpus, gpus, local)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_gpu_trials_on_node_types_without_any_gpu_are_refused_naming_the_types():
    msg = refusal(CPU_ONLY, 1, 1)
    assert "no GPU on any node type" in msg and "head (8 CPU, 0 GPU)" in msg and "cpu16" in msg
    assert "--gpus-per-trial 0" in msg and "cpu.yaml" in msg


def test_a_trial_larger_than_every_node_type_is_refused_with_what_fits():
    assert "--gpus-per-trial 8 or less" in refusal(GPU, 4, 9)
    assert "--cpus-per-trial 96 or less" in refusal(GPU, 200, 1)


def test_what_a_node_type_can_hold_is_not_refused_even_with_no_worker_up():
    check_trial_fits(GPU, 8, 1, local=False)
    check_trial_fits(ClusterShape(True, [], "unknown types"), 1000, 64, local=False)  # types unknown: Ray decides
    check_trial_fits(ClusterShape(True, [NodeType("w", {}, 2)], "filled by the provider"), 4, 8, local=False)


def test_fixed_clusters_refuse_locally_and_wait_remotely():
    live = ClusterShape(False, [NodeType("head 10.0.0.1", {"CPU": 2, "GPU": 0})])
    assert "no GPU on any node" in refusal(live, 1, 1, local=True)
    assert "100000 CPUs per trial" in refusal(live, 100000, 0, local=True)
    check_trial_fits(live, 1, 1, local=False)  # a node with a GPU may still join (ray start --address)


def test_pending_trials_cover_the_cluster_at_its_largest_and_one_on_a_fixed_cluster():
    assert pending_trials(GPU, 4, 1, None) == 32
    assert pending_trials(GPU, 4, 1, 3) == 3
    # a fixed cluster: what its live nodes hold at once (short trials would otherwise run one by one)
    assert pending_trials(ClusterShape(False, [NodeType("n", {"CPU": 64})]), 1, 0, None) == 64
    assert pending_trials(ClusterShape(False, [NodeType("a", {"CPU": 2}), NodeType("b", {"CPU": 3})]), 1, 0, None) == 5
    assert pending_trials(ClusterShape(False, [NodeType("n", {"CPU": 64, "GPU": 2})]), 4, 1, None) == 2
    assert pending_trials(ClusterShape(True, [], "unknown"), 1, 1, None) == 16


def test_a_trial_given_a_gpu_that_torch_cannot_use_fails_with_the_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch can use a GPU here")
    with pytest.raises(RuntimeError, match="Ray gave this trial GPU 0 .* torch cannot use it: .*--device cpu"):
        check_gpu_usable("auto", [0])
    with pytest.raises(RuntimeError):
        check_gpu_usable("cuda", ["0"])
    check_gpu_usable("cpu", [0])  # CPUs on purpose
    check_gpu_usable("auto", [])  # no GPU given: auto means the CPU


def test_trial_warnings_are_printed_logged_in_the_run_folder_and_handed_to_the_next_report(tmp_path, capsys):
    import warnings

    with TrialWarnings(tmp_path) as caught:
        warnings.warn("CUDA graph capture failed; training continues with eager steps.", RuntimeWarning,
                      stacklevel=1)
        first = caught.take()
        assert caught.take() == ""
    assert first.startswith("RuntimeWarning: CUDA graph capture failed")
    assert "CUDA graph capture failed" in (tmp_path / "warnings.log").read_text()
    assert "wbsweep trial warning: RuntimeWarning: CUDA graph" in capsys.readouterr().err
    assert warnings.showwarning is not caught.show  # restored


def test_the_autoscaler_report_is_told_in_a_few_words():
    """From the dict Ray's autoscaler writes (asdict of its own AutoscalerSummary)."""
    from dataclasses import asdict

    from ray.autoscaler._private.autoscaler import AutoscalerSummary

    from orchestrator.sweep.cluster import describe_autoscaler_report

    summary = AutoscalerSummary(active_nodes={"head": 1}, idle_nodes=None,
                                pending_nodes=[("10.0.0.7", "a100", "setting-up")],
                                pending_launches={"a100": 2, "cpu": 1}, failed_nodes=[("10.0.0.9", "a100")])
    assert describe_autoscaler_report(asdict(summary)) == "starting 3 a100, 1 cpu; 1 node launch(es) failed"
    idle = AutoscalerSummary(active_nodes={"head": 1}, idle_nodes=None, pending_nodes=[], pending_launches={},
                             failed_nodes=[])
    assert describe_autoscaler_report(asdict(idle)) == ""
