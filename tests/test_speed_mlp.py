"""The CPU step's SGD inside the backward pass (trainables/runner.py, EpochRunner._sgd_hook): the same
update as the optimizer's fused step, bit for bit, and nothing outside a training step."""

from __future__ import annotations

import warnings

import pytest
import torch

from orchestrator.bench.command import bench_config, synthetic_dataset
from trainables.device_data import DeviceData
from trainables.train import build_training

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model: str, width: int, extra: dict, in_backward: bool, epochs: int = 2) -> tuple[dict, dict, list]:
    data = synthetic_dataset("mnist" if model.startswith("mlp") else "cifar", 200, seed=11)
    cfg = bench_config(model, "cpu", 64, width, {"compile": "off", "epochs": 4, **extra})
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, CPU))
    runner = run.runner()
    assert runner._sgd_in_backward  # the CPU default
    runner._sgd_in_backward = in_backward
    losses = []
    for _ in range(epochs):
        loss_sum, _ = runner.epoch()
        run.sched.step()
        losses.append(float(loss_sum))
    bufs = {i: run.opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(run.model.parameters())
            if p.requires_grad and "momentum_buffer" in run.opt.state[p]}
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}, bufs, losses


@pytest.mark.parametrize(("model", "width", "extra"), [
    ("mlp3", 64, {}),
    ("mlp3", 64, {"wd_scope": "conv_only", "loss": "cb", "fr": 0.01}),  # two parameter groups
    ("mlp3", 32, {"momentum": 0.0}),  # no momentum buffers
    ("resnet32", 4, {"channels_last": True, "wd": 0.0}),
])
def test_sgd_in_backward_equals_the_fused_optimizer_step(model: str, width: int, extra: dict) -> None:
    """Two epochs with the update applied per parameter inside the backward pass and with one
    ``opt.step()`` after it: bit-identical weights, BN statistics, momentum buffers and losses."""
    a = _train(model, width, extra, in_backward=True)
    b = _train(model, width, extra, in_backward=False)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][i], b[1][i]) for i in a[1])
    assert bool(a[1]) == (extra.get("momentum", 0.9) != 0)
    assert a[2] == b[2]


def test_backward_outside_a_step_leaves_weights_and_gradients_alone() -> None:
    """The hooks act only inside the runner's step: a plain backward (as the benchmark's gradient
    check does) keeps the weights and leaves the gradients for the caller."""
    data = synthetic_dataset("mnist", 100, seed=12)
    cfg = bench_config("mlp3", "cpu", 64, 16, {"compile": "off"})
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, CPU))
    runner = run.runner()
    runner.epoch()
    before = {k: v.clone() for k, v in run.model.named_parameters()}
    x = runner.dd.prepare(runner.dd.x["train"][:64], False, None)
    loss, _ = runner._forward_loss(x, runner.dd.y["train"][:64])
    loss.backward()
    for k, p in run.model.named_parameters():
        assert torch.equal(p, before[k]) and p.grad is not None, k
    # ... and those gradients do not leak into the next epoch's first step
    runner.epoch(order=torch.arange(64))
    torch.manual_seed(0)
    clean = build_training(cfg, DeviceData(data, CPU))
    clean_runner = clean.runner()
    clean_runner.epoch()
    clean_runner.epoch(order=torch.arange(64))
    for (k, p), q in zip(run.model.named_parameters(), clean.model.parameters(), strict=True):
        assert torch.equal(p, q), k


def test_the_schedule_sees_the_optimizer_step() -> None:
    """No "lr_scheduler.step() before optimizer.step()" warning although opt.step() is not called."""
    data = synthetic_dataset("mnist", 100, seed=13)
    cfg = bench_config("mlp3", "cpu", 64, 16, {"compile": "off"})
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, CPU))
    runner = run.runner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.epoch()
        run.sched.step()
