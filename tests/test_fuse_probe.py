"""``fuse: auto``'s measurement (trainables/fuse_probe.py): the choice of K from measured
throughputs, the memory a model takes, and the probe on the cpu preset's MLP."""

from __future__ import annotations

import pytest
import torch

from trainables import fuse_probe
from trainables.config import resolve_config
from trainables.errors import WbsweepError
from trainables.fuse_probe import MIN_GAIN, choose_k, probe_fusion, saved_activation_bytes
from trainables.models import ModelSpec, build_model


@pytest.mark.parametrize("rates, k", [
    ({1: 100.0, 2: 180.0, 4: 200.0, 8: 205.0}, 4),  # 4 is within 5 % of the best (205): the smallest such K
    ({1: 100.0, 2: 180.0, 4: 150.0}, 2),  # past the peak
    ({1: 100.0, 2: 105.0, 4: 110.0}, 1),  # 1.10x < MIN_GAIN: fusing does not pay
    ({1: 100.0, 2: 90.0}, 1),  # one model is fastest
    ({1: 100.0, 2: 400.0}, 2),
])
def test_choose_k_takes_the_smallest_k_near_the_best_and_one_where_fusing_does_not_pay(rates, k) -> None:
    chosen, reason = choose_k(rates, k_memory=64)
    assert chosen == k, (chosen, reason)
    assert ("does not pay" in reason) == (k == 1)
    assert MIN_GAIN > 1.10


def test_choose_k_needs_the_single_model() -> None:
    with pytest.raises(WbsweepError, match="K = 1"):
        choose_k({2: 1.0, 4: 2.0}, 8)


def test_saved_activation_bytes_counts_what_autograd_keeps_by_hand() -> None:
    """relu(x @ w.T), x (64, 32) without grad, w (16, 32) with: the product keeps x for w's gradient
    (64*32*4 bytes) and ReLU keeps its output (64*16*4); nothing kept without grad."""
    x, w = torch.randn(64, 32), torch.randn(16, 32, requires_grad=True)
    assert saved_activation_bytes(lambda: torch.relu(x @ w.t())) == 64 * 32 * 4 + 64 * 16 * 4
    with torch.no_grad():
        assert saved_activation_bytes(lambda: torch.relu(x @ w.t())) == 0


CFG = {"dataset": "digits-lt", "model": "mlp3", "width": 32, "device": "cpu", "threads": 1, "lr": 0.05}


def test_probe_measures_a_ladder_and_stays_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the cpu preset's data: the ladder starts at the single model (K = 1) and doubles; a model's
    memory is at least 5x its tensors plus its batch; a budget of 3 models' memory stops the ladder
    at K = 2 and caps the choice there."""
    cfg = resolve_config(CFG)
    probe = probe_fusion(cfg, min_seconds=0.02, rounds=1, k_max=4)
    ks = sorted(probe.img_per_s_per_model)
    assert ks[0] == 1 and ks == [2 ** i for i in range(len(ks))] and ks[-1] <= 4
    assert probe.k in ks and all(v > 0 for v in probe.img_per_s_per_model.values())
    net = build_model(ModelSpec("mlp3", 10, 1, 8, "linear", False, 32))
    tensors = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    assert probe.bytes_per_model >= 5 * tensors + 64 * 64 * 4
    assert probe.k_memory == probe.bytes_budget // probe.bytes_per_model
    assert probe.as_dict()["img_per_s_per_model"].keys() == {str(k) for k in ks}  # JSON's keys

    monkeypatch.setattr(fuse_probe, "available_memory", lambda device, share: 3 * probe.bytes_per_model + 1)
    small = probe_fusion(cfg, min_seconds=0.02, rounds=1, k_max=16)
    assert small.k_memory == 3 and max(small.img_per_s_per_model) == 2 and small.k <= 2


def test_probe_needs_a_batch_of_training_images() -> None:
    """digits-lt's 423 training images hold no batch of 512: refused in one line (the sweep then
    trains one model per trial, orchestrator/sweep/fusion.py)."""
    with pytest.raises(WbsweepError, match="a batch of 512 training images; the dataset has 423"):
        probe_fusion({**CFG, "batch_size": 512})
