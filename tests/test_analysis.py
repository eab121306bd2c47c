"""The analyses of the paper's Table 3 and Figures 1-6 (trainables/analysis.py): each pure function
against hand-computed values, then the whole chain on a tiny trained run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trainables.analysis import (
    class_cosine_matrix,
    class_mean_norms,
    fdr_random_layer,
    forgetting_from_history,
    forgetting_scores,
    hooked_layers,
    layer_outputs,
    missing_analyses,
    random_layer,
    relu_fdr,
    result_rows,
    run_analyses,
    weight_norm_ratio,
)
from trainables.config import ANALYSES
from trainables.metrics import fdr
from trainables.models import ModelSpec, build_model
from trainables.train import train

# --- Table 3: the random layer -----------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 512])
def test_random_layer_init_range(d: int) -> None:
    w, b = random_layer(d, seed=3)
    bound = 1 / math.sqrt(d)
    assert w.shape == (d, d) and b.shape == (d,)
    for t in (w, b):
        assert float(t.abs().max()) <= bound
    # uniform over the whole range: the extremes come close to +-bound, the mean near 0, var bound^2/3
    assert float(w.max()) > 0.9 * bound and float(w.min()) < -0.9 * bound
    if d == 512:
        assert abs(float(w.mean())) < 0.01 * bound
        assert float(w.var()) == pytest.approx(bound**2 / 3, rel=0.02)
    w2, b2 = random_layer(d, seed=3)
    assert torch.equal(w, w2) and torch.equal(b, b2)  # seeded
    assert not torch.equal(w, random_layer(d, seed=4)[0])


def test_fdr_random_layer_before_is_the_features_fdr_and_after_applies_the_layer() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 6)) + y[:, None]
    r = fdr_random_layer(x, y, 3, seed=1)
    assert r["before"] == pytest.approx(fdr(x, y, 3))
    w, b = random_layer(6, seed=1)
    after = np.maximum(x @ w.numpy().T + b.numpy(), 0)
    assert r["after"] == pytest.approx(fdr(after, y, 3))


# --- Figures 1, 3, 5: cosine and norms ----------------------------------------------------------


def test_class_cosine_matrix_by_hand() -> None:
    # class 0: (1, 0), (1, 0), (0, 1); class 1: (0, 2) and the zero vector (cosine 0 with anything)
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 2], [0, 0]], dtype=float)
    y = np.array([0, 0, 0, 1, 1])
    m = class_cosine_matrix(x, y, 3)
    # within class 0, pairs a != b: (1,2): 1, (1,3): 0, (2,3): 0 -> each counted twice: mean 1/3
    assert m[0, 0] == pytest.approx(1 / 3)
    # within class 1: the one pair involves the zero vector -> 0
    assert m[1, 1] == pytest.approx(0.0)
    # between: class-0 features x class-1 features: cos((1,0),(0,2)) = 0 twice, cos((0,1),(0,2)) = 1,
    # and 0 with the zero vector three times: 1 / 6
    assert m[0, 1] == pytest.approx(1 / 6) and m[1, 0] == pytest.approx(1 / 6)
    assert np.isnan(m[2]).all() and np.isnan(m[:, 2]).all()  # class 2 has no samples
    # against a brute-force double loop on random data
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(3):
        for j in range(3):
            pairs = [u[a] @ u[b] for a in np.flatnonzero(y == i) for b in np.flatnonzero(y == j) if a != b]
            assert class_cosine_matrix(x, y, 3)[i, j] == pytest.approx(np.mean(pairs))


def test_class_mean_norms_by_hand() -> None:
    x = np.array([[3, 0], [3, 8], [1, 1]], dtype=float)
    y = np.array([0, 0, 1])
    norms = class_mean_norms(x, y, 3)
    assert norms[0] == pytest.approx(5.0) and norms[1] == pytest.approx(math.sqrt(2))
    assert np.isnan(norms[2])


def test_weight_norm_ratio_is_relative_to_the_largest_class() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 10.0], [1.0, 0.0]])
    norms, ratio = weight_norm_ratio(w, [50, 100, 5])  # class 1 has the most images
    assert norms.tolist() == pytest.approx([5.0, 10.0, 1.0])
    assert ratio.tolist() == pytest.approx([0.5, 1.0, 0.1])


# --- Figure 4: forgetting --------------------------------------------------------------------------


def test_forgetting_scores_on_a_hand_made_history() -> None:
    # rows: presentations (epochs), columns: 6 training images; 1 = classified correctly
    history = np.array([
        [0, 1, 1, 0, 0, 1],
        [1, 0, 1, 0, 1, 1],
        [0, 1, 1, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ])
    events, ever = forgetting_from_history(history)
    assert events.tolist() == [1, 2, 0, 0, 1, 1]  # correct -> wrong transitions
    assert ever.tolist() == [True, True, True, False, True, True]
    labels = np.array([0, 0, 0, 1, 1, 2])
    s = forgetting_scores(events, ever, labels, 4)
    assert s["count"].tolist() == [3, 2, 1, 0]
    # class 0: all learned, events 1, 2, 0 -> mean 1; one of three never forgotten
    assert s["mean"][0] == pytest.approx(1.0) and s["unforgettable"][0] == pytest.approx(1 / 3)
    # class 1: image 3 never learned (infinite score, left out of the mean), image 4 forgotten once
    assert s["mean"][1] == pytest.approx(1.0) and s["never_learned"][1] == pytest.approx(0.5)
    assert s["unforgettable"][1] == pytest.approx(0.0)
    assert s["mean"][2] == pytest.approx(1.0) and s["never_learned"][2] == 0.0
    assert np.isnan(s["mean"][3]) and np.isnan(s["never_learned"][3])  # no images
    with pytest.raises(ValueError):
        forgetting_scores(events, ever[:3], labels, 4)


def test_training_records_forgetting_consistently(tmp_path: Path) -> None:
    train({**TINY, "track_forgetting": True, "epochs": 3}, tmp_path)
    with np.load(tmp_path / "forgetting.npz") as z:
        events, ever, labels = z["events"], z["ever_correct"], z["labels"]
    assert events.shape == ever.shape == labels.shape == (423,)
    assert (events >= 0).all() and (events <= 1).all()  # 3 presentations allow at most one event
    assert not (events[~ever] > 0).any()  # an image never correct cannot be forgotten


# --- Figure 2: ReLU-FDR per layer ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("mlp3", ["Linear", "BatchNorm1d"] * 3),
    ("resblock1", ["Linear", "BatchNorm1d", "Linear", "BatchNorm1d", "Linear", "BatchNorm1d", "ResBlock1d"]),
])
def test_relu_fdr_returns_one_value_per_layer(name: str, expected: list[str]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, 3, 1, 4, width=8))
    x = torch.randn(60, 1, 4, 4)
    y = np.arange(60) % 3
    outs = layer_outputs(model, [x[:32], x[32:]])
    assert [label.split(":")[1] for label, _ in outs] == expected  # execution order
    assert all(f.shape == (60, 8) for _, f in outs)
    values = relu_fdr(outs, y, 3)
    assert len(values) == len(expected) == len(hooked_layers(model))
    # each value is the FDR of ReLU(that layer's output), computed by hand for the first layer
    lin = model.backbone[1]
    with torch.no_grad():
        first = torch.relu(lin(x.flatten(1))).numpy()
    assert values[0] == pytest.approx(fdr(first, y, 3), rel=1e-6)
    # the model's forward is untouched: no hooks left behind
    assert all(not m._forward_hooks for m in model.modules())


def test_conv_layers_are_averaged_over_space() -> None:
    model = build_model(ModelSpec("resnet32", 3, 3, 8, width=4))
    outs = layer_outputs(model, [torch.randn(5, 3, 8, 8)])
    assert all(f.dim() == 2 and f.shape[0] == 5 for _, f in outs)
    assert sum(isinstance(m, nn.Conv2d) for _, m in hooked_layers(model)) == 31


# --- one finished run -------------------------------------------------------------------------------

TINY = {"dataset": "digits-lt", "model": "mlp3", "width": 16, "epochs": 2, "threads": 1, "device": "cpu",
        "la": ["none"], "seed": 0}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    train({**TINY, "track_forgetting": True, "analyses": list(ANALYSES)}, out)
    torch.set_num_threads(n)
    return out


def test_random_layer_train_fdr_sees_the_images_the_trainers_train_fdr_saw(tmp_path: Path, make_cifar) -> None:
    """With augmentation (CIFAR), Table 3's "before" train FDR is the run's fdr_train: augmented
    train images by default (the authors' code), un-augmented with fdr_train_augment=false."""
    make_cifar(tmp_path / "data", 10, 60, 10)
    base = {"dataset": "cifar10-lt", "data_root": str(tmp_path / "data"), "rho": 10, "model": "resnet32",
            "width": 4, "epochs": 1, "threads": 1, "device": "cpu", "la": ["none"], "compile": "off"}
    n = torch.get_num_threads()
    got = {}
    for augment in (True, False):
        out = tmp_path / f"augment-{augment}"
        train({**base, "fdr_train_augment": augment}, out)
        fdr_train = json.loads((out / "metrics.json").read_text())["fdr_train"]
        got[augment] = (run_analyses(out, ["fdr_random_layer"], plots=False)["analyses"]["fdr_random_layer"],
                        fdr_train)
    torch.set_num_threads(n)
    for a, fdr_train in got.values():
        assert a["before_train"] == pytest.approx(fdr_train, rel=1e-6)
    assert got[True][1] != pytest.approx(got[False][1], rel=1e-3)  # the switch does change what is measured


def test_run_analyses_writes_numbers_and_plots(finished_run: Path) -> None:
    assert missing_analyses(finished_run, ANALYSES) == list(ANALYSES)
    result = run_analyses(finished_run)  # the config's own list: all of them
    assert set(result["analyses"]) == set(ANALYSES) and result["skipped"] == {}
    saved = json.loads((finished_run / "analysis.json").read_text())
    assert saved["config_hash"] == json.loads((finished_run / "metrics.json").read_text())["config_hash"]
    for name in ANALYSES:
        assert (finished_run / f"analysis-{name}.png").stat().st_size > 1000
    a = saved["analyses"]
    assert len(a["class_cosine"]["matrix"]) == 10 and len(a["feature_norms"]["norms"]) == 10
    assert a["weight_norms"]["ratio"][0] == pytest.approx(1.0)  # class 0 has the most images
    assert len(a["relu_fdr"]["trained"]) == len(a["relu_fdr"]["untrained"]) == 6
    assert a["forgetting"]["count"] == saved["class_counts"]
    # the "before" FDR on test equals the FDR the trainer measured (same features, no augmentation)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert a["fdr_random_layer"]["before_test"] == pytest.approx(metrics["fdr_test"], rel=1e-6)
    # the last layer's ReLU-FDR is that of the features (the backbone ends with a ReLU)
    assert a["relu_fdr"]["trained"][-1] == pytest.approx(metrics["fdr_test"], rel=1e-6)
    assert missing_analyses(finished_run, ANALYSES) == []


def test_result_rows_are_long_format(finished_run: Path) -> None:
    result = run_analyses(finished_run, ["class_cosine", "fdr_random_layer"])
    rows = result_rows(result)
    cos = [r for r in rows if r["analysis"] == "class_cosine"]
    assert len(cos) == 100 and {(r["i"], r["j"]) for r in cos} == {(i, j) for i in range(10) for j in range(10)}
    fdr_rows = {r["key"]: r["value"] for r in rows if r["analysis"] == "fdr_random_layer"}
    assert set(fdr_rows) == {"before_test", "after_test", "before_train", "after_train"}
    relu = [r for r in rows if r["analysis"] == "relu_fdr" and r["key"] == "trained"]
    assert [r["i"] for r in relu] == list(range(6)) and relu[0]["label"] == "1:Linear"


def test_forgetting_is_skipped_with_a_reason_without_the_history(tmp_path: Path) -> None:
    train(dict(TINY), tmp_path)
    result = run_analyses(tmp_path, ["forgetting", "weight_norms"])
    assert "forgetting" in result["skipped"] and "track_forgetting" in result["skipped"]["forgetting"]
    assert "weight_norms" in result["analyses"]
    assert missing_analyses(tmp_path, ["forgetting"]) == []  # not retried forever


def test_analyses_option_is_validated_and_not_hashed() -> None:
    from trainables.config import config_hash, resolve_config
    from trainables.errors import WbsweepError

    assert config_hash(resolve_config({"analyses": ["class_cosine"]})) == config_hash(resolve_config({}))
    with pytest.raises(WbsweepError, match="analyses"):
        resolve_config({"analyses": ["heatmap"]})
    with pytest.raises(WbsweepError, match="track_forgetting"):
        resolve_config({"analyses": ["forgetting"]})


def test_run_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from trainables.errors import WbsweepError

    with pytest.raises(WbsweepError, match="model.pt"):
        run_analyses(tmp_path, ["class_cosine"])


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path / "model.pt", weights_only=True)["model"]


def test_stage2_init_norm_scales_classifier_rows_to_one(tmp_path: Path) -> None:
    """WD&Norm&CB (figure 6): rows normalised before stage 2, no MaxNorm. With lr 0 the rows stay
    exactly at unit norm, so the normalisation is what moved them."""
    first = tmp_path / "s1"
    train(dict(TINY), first)
    w1 = _state(first)["classifier.weight"]
    assert not torch.allclose(w1.norm(dim=1), torch.ones(10))
    cfg = {**TINY, "stage2": True, "init_from": str(first / "model.pt"), "stage2_epochs": 1, "lr": 0.0}
    train({**cfg, "stage2_init_norm": True, "maxnorm": "none"}, tmp_path / "norm")
    w2 = _state(tmp_path / "norm")["classifier.weight"]
    torch.testing.assert_close(w2.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(w2, w1 / w1.norm(dim=1, keepdim=True))  # directions kept
    train({**cfg, "maxnorm": "none"}, tmp_path / "plain")
    assert torch.equal(_state(tmp_path / "plain")["classifier.weight"], w1)
