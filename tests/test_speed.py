"""Tests of the fast trainer's machinery: augmentation exactly as torchvision's, the same weights as
the naive reference trainer, every speed knob, no host reads inside an epoch, resume, and the
benchmark command. Timings are never asserted (the benchmark measures them)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from orchestrator.bench.command import bench_config, synthetic_dataset
from orchestrator.cli import main
from trainables.config import DEFAULTS, config_hash, resolve_config
from trainables.device_data import DeviceData, crop_flip, crop_flip_at, draw_crop_flip
from trainables.errors import WbsweepError
from trainables.models import ModelSpec, build_model
from trainables.reference import ImageArrayDataset, ReferenceTrainer, reference_transform
from trainables.run_files import load_metrics
from trainables.runner import AUTO_COMPILE_MIN_STEPS, Knobs
from trainables.train import build_training, train

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# --- augmentation: exactly torchvision's for the same offsets --------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 6, 10)])
def test_crop_flip_at_equals_torchvision_for_fixed_offsets(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    pad = 4
    images = torch.from_numpy(np.random.default_rng(0).integers(1, 256, size=(40, c, h, w), dtype=np.uint8))
    # every offset pair at least once, both flips
    oy = torch.arange(40) % (2 * pad + 1)
    ox = (torch.arange(40) * 5) % (2 * pad + 1)
    flip = torch.arange(40) % 3 == 0
    out = crop_flip_at(images, pad, oy, ox, flip)
    for i in range(40):
        top, left = int(oy[i]), int(ox[i])
        # torchvision on the uint8 tensor: RandomCrop(padding=pad) pads with zeros, then crops at
        # (top, left) of the padded image; RandomHorizontalFlip mirrors the crop
        want = TF.crop(TF.pad(images[i], [pad]), top, left, h, w)
        if flip[i]:
            want = TF.hflip(want)
        assert torch.equal(out[i], want), i
        # and on the PIL image, as the paper's data pipeline does it
        arr = images[i].permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
        got = TF.crop(TF.pad(pil, [pad]), top, left, h, w)
        if flip[i]:
            got = TF.hflip(got)
        got_arr = np.asarray(got)
        got_arr = got_arr[None] if c == 1 else got_arr.transpose(2, 0, 1)
        assert np.array_equal(out[i].numpy(), got_arr), i


def test_crop_flip_is_draw_then_apply() -> None:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = crop_flip(images, 4, torch.Generator().manual_seed(9))
    oy, ox, flip = draw_crop_flip(64, 4, torch.Generator().manual_seed(9))
    assert torch.equal(out, crop_flip_at(images, 4, oy, ox, flip))
    assert int(oy.min()) >= 0 and int(oy.max()) <= 8 and int(ox.min()) >= 0 and int(ox.max()) <= 8


def test_torchvision_random_crop_draws_the_same_offsets() -> None:
    """RandomCrop(32, padding=4) draws the top/left corner of the crop uniformly in 0..8 of the
    padded 40x40 image, which is what crop_flip's offsets are."""
    torch.manual_seed(0)
    padded = torch.zeros(3, 40, 40)
    corners = [T_get_params(padded) for _ in range(3000)]
    tops = np.bincount([t for t, _ in corners], minlength=9)
    lefts = np.bincount([le for _, le in corners], minlength=9)
    assert len(tops) == 9 and len(lefts) == 9 and tops.min() > 0 and lefts.min() > 0


def T_get_params(padded: torch.Tensor) -> tuple[int, int]:
    from torchvision.transforms import RandomCrop

    top, left, h, w = RandomCrop.get_params(padded, (32, 32))
    assert (h, w) == (32, 32)
    return top, left


def test_normalisation_is_bit_identical_to_totensor_normalize() -> None:
    data = synthetic_dataset("cifar", 16)
    dd = DeviceData(data, CPU)
    fast = dd.normalise(dd.x["train"])
    ds = ImageArrayDataset(data.x_train, data.y_train, reference_transform(data, augment=False))
    slow = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(fast, slow)
    assert torch.equal(dd.normalise(dd.x["train"], channels_last=True), slow)


# --- the fast trainer gives the reference trainer's weights ---------------------------------------


def _pair(model: str, width: int | None, n: int, extra: dict[str, Any]):
    data = synthetic_dataset("mnist" if model.startswith("mlp") else "cifar", n, seed=3)
    cfg = bench_config(model, "cpu", 64, width, {"compile": "off", **extra})
    torch.manual_seed(0)
    fast = build_training(cfg, DeviceData(data, CPU))
    init = {k: v.detach().clone() for k, v in fast.model.state_dict().items()}
    ref_model = build_model(ModelSpec(model, data.num_classes, data.x_train.shape[1], data.x_train.shape[-1],
                                      cfg["classifier"], cfg["etf_bias"], width, etf_seed=cfg["seed"]))
    ref_model.load_state_dict(fast.model.state_dict())
    ref = ReferenceTrainer(cfg, data, ref_model, CPU, augment=False)
    return data, fast, ref, init


def _relative_update_difference(a: dict, b: dict, init: dict) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point())
    den = sum(float(((b[k].double() - init[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point())
    return math.sqrt(num / den)


@pytest.mark.parametrize(("model", "width", "n", "extra"), [
    ("mlp3", 64, 300, {}),
    ("mlp3", 64, 300, {"loss": "cb", "fr": 0.01, "wd_scope": "conv_only"}),
    ("resnet32", 4, 140, {"channels_last": False}),
    ("mlp3", 64, 300, {"classifier": "etf", "loss": "dr", "fr": 0.01}),
    ("resnet32", 4, 140, {"channels_last": False, "fr": 0.01, "wd": 0.0}),
])
def test_one_epoch_matches_the_reference_trainer(model: str, width: int, n: int, extra: dict) -> None:
    """Same init, same batch order, no augmentation: one epoch of each trainer gives the same weights
    (BN statistics included) and loss to fp32 rounding. (Not more epochs: from ulp-level
    differences, training on random images diverges within a few more steps.)"""
    data, fast, ref, init = _pair(model, width, n, extra)
    n = len(data.y_train)
    assert n % 64 not in (0, 1)  # a partial last batch, and not one of one
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    loss_sum, seen = fast.runner().epoch(order=order, augment=False)
    fast.sched.step()
    ref_loss, ref_seen = ref.epoch(order=order)
    assert seen == ref_seen == n
    assert float(loss_sum) / seen == pytest.approx(ref_loss, rel=1e-6)
    assert fast.opt.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"] < 0.01  # the schedule moved
    fs, rs = fast.model.state_dict(), ref.model.state_dict()
    assert _relative_update_difference(fs, rs, init) < 1e-6
    for k in fs:
        torch.testing.assert_close(fs[k].float(), rs[k].float(), rtol=1e-5, atol=1e-7)


def test_channels_last_is_fp32_accurate() -> None:
    """channels_last changes the kernels, not the arithmetic: the loss agrees to fp32 rounding and the
    gradient is within 1e-2 of the float64 one (TF32's level, what PyTorch uses for fp32 convolutions
    on NVIDIA GPUs by default). PyTorch's channels-last BatchNorm on CPUs rounds more than its NCHW
    kernel (about 2e-6 instead of 1e-7 per layer), which the deep net amplifies in the gradient."""
    from orchestrator.bench.knobs import _grads

    data = synthetic_dataset("cifar", 80, seed=1)
    base = {"channels_last": False, "precision": "fp32", "compile": "off"}
    g64, l64 = _grads(data, CPU, "resnet32", 32, 8, base, float64=True)
    g32, l32 = _grads(data, CPU, "resnet32", 32, 8, base)
    gcl, lcl = _grads(data, CPU, "resnet32", 32, 8, {**base, "channels_last": True})
    e32, ecl = float((g32 - g64).norm() / g64.norm()), float((gcl - g64).norm() / g64.norm())
    assert e32 < 1e-2 and ecl < max(10 * e32, 1e-2)
    assert l32 == pytest.approx(l64, rel=1e-6) and lcl == pytest.approx(l64, rel=1e-5)


# --- the knobs ---------------------------------------------------------------------------------


def test_knob_defaults_and_validation() -> None:
    cfg = resolve_config({})
    assert cfg["channels_last"] is True and cfg["precision"] == "fp32" and cfg["compile"] == "auto"
    assert cfg["eval_batch_size"] == 1024
    assert resolve_config({"compile": False})["compile"] == "off"  # `compile: off` in YAML
    for bad in ({"channels_last": "yes"}, {"precision": "fp16"}, {"compile": "jit"}, {"eval_batch_size": 0}):
        with pytest.raises(WbsweepError, match=next(iter(bad))):
            resolve_config(bad)
    # compile "auto" on a CPU: torch.compile only for a convolutional model's long run
    assert Knobs.resolve(cfg, CPU) == Knobs(channels_last=True, precision="fp32", compile="off", strict=False)
    assert Knobs.resolve(cfg, CPU, conv=False, steps=10**6).compile == "off"
    assert Knobs.resolve(cfg, CPU, conv=True, steps=AUTO_COMPILE_MIN_STEPS - 1).compile == "off"
    assert Knobs.resolve(cfg, CPU, conv=True, steps=AUTO_COMPILE_MIN_STEPS).compile == "torch"
    assert Knobs.resolve(cfg, torch.device("cuda"), conv=False).compile == "cudagraph"
    assert Knobs.resolve(resolve_config({"compile": "off"}), CPU, conv=True, steps=10**6).strict
    with pytest.raises(WbsweepError, match="needs a CUDA device"):
        Knobs.resolve(resolve_config({"compile": "cudagraph"}), CPU)
    # a 320-epoch CIFAR100-LT-shaped resnet32 run compiles; the same run of an MLP does not
    data = synthetic_dataset("cifar", 10_000)
    torch.manual_seed(0)
    run = build_training(bench_config("resnet32", "cpu", 64, 4), DeviceData(data, CPU))
    assert run.knobs.compile == "torch"
    run = build_training(bench_config("resnet32", "cpu", 64, 4, {"epochs": 2}), DeviceData(data, CPU))
    assert run.knobs.compile == "off"


def test_which_knobs_are_hashed() -> None:
    base = config_hash(resolve_config({}))
    # pure speed: same arithmetic, same hash
    for over in ({"channels_last": False}, {"compile": "off"}, {"compile": "torch"}, {"eval_batch_size": 7}):
        assert config_hash(resolve_config(over)) == base, over
    # bf16 changes the numbers: another experiment
    assert config_hash(resolve_config({"precision": "bf16"})) != base
    # fp32 (the default) leaves the hash of runs made before the key existed unchanged
    legacy = {k: v for k, v in resolve_config({}).items() if k not in ("precision", "channels_last", "compile")}
    assert config_hash(legacy) == base
    assert DEFAULTS["precision"] == "fp32"


def same(a: Any, b: Any) -> bool:
    """Equal, NaN included (a group without classes has NaN accuracy)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _tiny_cifar(val_per_class: int = 20):
    return synthetic_dataset("cifar", 70, seed=2, test_images=60, val_per_class=val_per_class)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_knob_combination_trains_on_cpu(tmp_path: Path, channels_last: bool, precision: str) -> None:
    """Every layout and precision trains and evaluates (with evaluation batches of 7: the last one
    partial); that the evaluation batch size changes no result: the next test."""
    eval_batch_size = 7
    # 2 validation images per class (20 images: batches of 7, 7 and 6) instead of 20 per class (200 images
    # in 29 batches of 7 were four fifths of this test's time); the test set stays 60 images (8 x 7 + 4)
    data = _tiny_cifar(val_per_class=2)
    cfg = {"model": "resnet32", "width": 4, "epochs": 1, "batch_size": 32, "device": "cpu", "la": ["none"],
           "channels_last": channels_last, "precision": precision, "eval_batch_size": eval_batch_size,
           "compile": "off"}
    metrics = train(cfg, tmp_path, data=data)
    assert math.isfinite(metrics["history"][0]["train_loss"]) and math.isfinite(metrics["fdr_test"])
    assert same(load_metrics(tmp_path), metrics)
    state = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert all(v.is_contiguous() for v in state.values())  # model.pt is layout-independent


def test_eval_batch_size_does_not_change_results(tmp_path: Path) -> None:
    data = _tiny_cifar()
    cfg = {"model": "resnet32", "width": 4, "epochs": 2, "batch_size": 32, "device": "cpu", "la": ["none", "add"],
           "compile": "off"}
    a = train({**cfg, "eval_batch_size": 1024}, tmp_path / "a", data=data)
    b = train({**cfg, "eval_batch_size": 13}, tmp_path / "b", data=data)
    assert [h["val_acc"] for h in a["history"]] == [h["val_acc"] for h in b["history"]]
    assert same(a["la"], b["la"])
    assert a["fdr_test"] == pytest.approx(b["fdr_test"], rel=1e-4)


@pytest.mark.parametrize("mode", ["cudagraph", "cudagraph+torch"])
def test_cudagraph_on_a_cpu_says_it_needs_cuda(tmp_path: Path, mode: str) -> None:
    with pytest.raises(WbsweepError, match=re.escape(f"compile={mode} ") + ".*CUDA"):
        train({"epochs": 1, "width": 16, "device": "cpu", "compile": mode, "la": ["none"]}, tmp_path)


@pytest.mark.slow
def test_torch_compile_trains_a_step_on_cpu(tmp_path: Path) -> None:
    """torch.compile takes about a minute to compile even a tiny MLP on two cores: slow."""
    metrics = train({"epochs": 1, "width": 16, "device": "cpu", "compile": "torch", "la": ["none"]}, tmp_path)
    assert math.isfinite(metrics["history"][0]["train_loss"])


def test_no_host_reads_inside_an_epoch(monkeypatch: pytest.MonkeyPatch, forbid_host_reads) -> None:
    """An epoch never reads a tensor's value on the host (on a GPU each read would wait for it)."""
    data = synthetic_dataset("cifar", 150, seed=4)
    cfg = bench_config("resnet32", "cpu", 32, 4, {"track_forgetting": True, "fr": 0.01})
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, CPU))
    n = len(data.y_train)
    forgetting = {k: torch.zeros(n, dtype=torch.long if k == "events" else torch.bool)
                  for k in ("events", "prev_correct", "ever_correct")}
    runner = run.runner(forgetting)
    forbid_host_reads()
    loss_sum, seen = runner.epoch()
    monkeypatch.undo()
    assert seen == n and math.isfinite(float(loss_sum))
    assert int(forgetting["events"].sum()) >= 0 and forgetting["prev_correct"].dtype == torch.bool


def test_learning_rate_from_device_tensors_follows_the_schedule() -> None:
    """On a GPU the SGD step reads each epoch's learning rate from device tensors (what lets a CUDA
    graph replay the step across epochs). The same mechanism on a CPU: with a 2-epoch cosine
    schedule (epoch 2 at half the rate) it trains as the plain float learning rate does."""
    data = synthetic_dataset("mnist", 300, seed=8)
    cfg = bench_config("mlp3", "cpu", 64, 64, {"epochs": 2, "compile": "off", "wd": 5e-3})
    weights = []
    for device_lr in (False, True):
        torch.manual_seed(0)
        run = build_training(cfg, DeviceData(data, CPU))
        runner = run.runner()
        if device_lr:
            runner._lr = [torch.tensor(0.0) for _ in run.opt.param_groups]  # refilled by epoch()
        for _ in range(2):
            runner.epoch()
            run.sched.step()
        weights.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
        if device_lr:
            assert [float(t) for t in runner._lr] == pytest.approx([0.005] * len(runner._lr))
            assert all(isinstance(g["lr"], float) for g in run.opt.param_groups)  # the float is put back
    plain, tensor = weights
    for k in plain:
        torch.testing.assert_close(tensor[k].float(), plain[k].float(), rtol=1e-5, atol=1e-6)


# --- what the refactor must keep: resume, forgetting, MaxNorm per epoch ------------------------------


class Stop(Exception):
    pass


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    # 4 validation images per class, not 20: the 200 images were two thirds of this test's time, and
    # what it compares (history, test metrics, forgetting events, every weight bit for bit) is as exact
    data = synthetic_dataset("cifar", 100, seed=5, test_images=50, val_per_class=4)
    cfg = {"model": "resnet32", "width": 4, "epochs": 4, "batch_size": 32, "device": "cpu", "la": ["none"],
           "checkpoint_seconds": 0, "track_forgetting": True, "wd": 5e-3}
    whole = train(cfg, tmp_path / "whole", data=data)

    def stop_after_two(m: dict[str, Any]) -> None:
        if m["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", report=stop_after_two, data=data)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = train(cfg, tmp_path / "cut", data=data)
    assert resumed["history"] == whole["history"]
    assert same(resumed["la"], whole["la"]) and resumed["fdr_test"] == whole["fdr_test"]
    a, b = (np.load(tmp_path / d / "forgetting.npz") for d in ("whole", "cut"))
    assert np.array_equal(a["events"], b["events"]) and np.array_equal(a["ever_correct"], b["ever_correct"])
    wa = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_of_another_seed_is_not_resumed(tmp_path: Path) -> None:
    """The seed is not in the config hash: a folder holding seed 3's checkpoint must train seed 4
    from scratch, not continue seed 3's run."""
    data = synthetic_dataset("mnist", 200, seed=6, test_images=50)
    cfg = {"model": "mlp3", "width": 32, "epochs": 3, "device": "cpu", "la": ["none"], "lr": 0.05,
           "checkpoint_seconds": 0}

    def stop_after_two(m: dict[str, Any]) -> None:
        if m["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train({**cfg, "seed": 3}, tmp_path / "shared", report=stop_after_two, data=data)
    assert torch.load(tmp_path / "shared" / "checkpoint.pt", weights_only=True)["seed"] == 3
    reused = train({**cfg, "seed": 4}, tmp_path / "shared", data=data)
    fresh = train({**cfg, "seed": 4}, tmp_path / "fresh", data=data)
    seed3 = train({**cfg, "seed": 3}, tmp_path / "seed3", data=data)
    assert reused["history"] == fresh["history"] != seed3["history"]


def test_stage2_maxnorm_per_epoch(tmp_path: Path) -> None:
    data = synthetic_dataset("mnist", 200, seed=6, test_images=50)
    base = {"model": "mlp3", "width": 32, "epochs": 2, "device": "cpu", "la": ["none"], "lr": 0.05}
    train(base, tmp_path / "s1", data=data)
    first = tmp_path / "s1" / "model.pt"
    train({**base, "stage2": True, "init_from": str(first), "maxnorm": "epoch", "stage2_epochs": 2},
          tmp_path / "s2", data=data)
    w1 = torch.load(first, weights_only=True)["model"]["classifier.weight"].double()
    w2 = torch.load(tmp_path / "s2" / "model.pt", weights_only=True)["model"]["classifier.weight"].double()
    n1 = w1.norm(dim=1)
    threshold = float(n1.min() + 0.1 * (n1.max() - n1.min()))
    assert (w2.norm(dim=1) <= threshold + 1e-5).all()


# --- the benchmark command -----------------------------------------------------------------------


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    threads_before = torch.get_num_threads()
    code = main(["bench", "--device", "cpu", "--model", "mlp3", "--width", "16", "--images", "256", "--rounds", "1",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("device", "model", "naive_img_per_s", "wbsweep_img_per_s", "speedup"):
        assert key in out
    assert out["device"] == "cpu" and out["model"] == "mlp3" and out["equal_precision"] is True
    assert out["naive_img_per_s"] > 0 and out["wbsweep_img_per_s"] > 0
    assert out["speedup"] == pytest.approx(out["wbsweep_img_per_s"] / out["naive_img_per_s"], rel=0.02)
    # both trainers get every core the process may use; the caller's thread setting comes back
    assert out["threads"] == len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == threads_before
    assert len(out["load_average_before"]) == 3 and len(out["load_average_after"]) == 3


def test_bench_cuda_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_packed_workers_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The packed-trials protocol (worker processes, ready/go, JSON results) on a CPU."""
    code = main(["bench", "--device", "cpu", "--model", "mlp3", "--width", "16", "--images", "256", "--skip-compare",
                 "--packed", "2", "--packed-seconds", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)["packed_auto"]
    assert out["packed_trials"] == 2 and len(out["per_trial_img_per_s_2"]) == 2 and out["single_img_per_s"] > 0


def test_throttled_report_sends_the_first_epoch_then_at_most_one_per_interval(monkeypatch):
    from trainables import trial

    clock = iter([0.0, 0.3, 0.9, 1.2, 1.25, 2.5])
    monkeypatch.setattr(trial.time, "monotonic", lambda: next(clock))
    sent = []
    report = trial.ThrottledReport(sent.append, interval=1.0)
    for epoch in range(1, 7):
        report({"epoch": epoch, "val_acc": 10.0 * epoch, "train_loss": 1.0, "lr": 0.1})
    assert [m["epoch"] for m in sent] == [1, 4, 6]  # t = 0, 1.2, 2.5
    assert all(m["objective"] == m["val_acc"] for m in sent)


def test_only_synchronising_calls_count_as_host_syncs() -> None:
    from orchestrator.bench.command import is_sync_warning

    assert is_sync_warning("called a synchronizing CUDA operation")
    assert not is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect all "
                               "synchronizing operations (Triggered internally at Module.cpp:1003.)")
