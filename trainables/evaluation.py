"""Measuring a model: predictions and balanced accuracy (each epoch's validation), features and
logits of a split, and :func:`evaluate`, the final measurement of a run (FDR, Many/Medium/Few
accuracy per post-hoc LA variant).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from trainables.config import LA_KINDS, objective
from trainables.device_data import DeviceData
from trainables.metrics import fdr, group_accuracy, per_class_recall
from trainables.models import Network
from trainables.posthoc import adjust_logits, default_grid, tune_la
from trainables.runner import Knobs, has_conv


@torch.no_grad()
def features_and_logits(
    model: Network, dd: DeviceData, split: str, batch: int, augment: bool = False, seed: int = 0,
    knobs: Knobs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-input features and logits of a whole split, in eval mode, on the CPU (float32)."""
    model.eval()
    knobs = knobs or Knobs()
    cl = knobs.channels_last and has_conv(model)
    gen = torch.Generator(device=dd.device).manual_seed(seed)
    feats, logits = [], []
    x = dd.x[split]
    for i in range(0, len(x), batch):
        with knobs.autocast(dd.device):
            f = model.backbone(dd.prepare(x[i : i + batch], augment, gen, cl))
            z = model.classifier(f)
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
    return torch.cat(feats), torch.cat(logits)


@torch.no_grad()
def predict(model: Network, dd: DeviceData, split: str, batch: int, knobs: Knobs | None = None) -> torch.Tensor:
    """Predicted classes of a split, in eval mode, left on the device (no host synchronisation)."""
    model.eval()
    knobs = knobs or Knobs()
    cl = knobs.channels_last and has_conv(model)
    x, preds = dd.x[split], []
    for i in range(0, len(x), batch):
        with knobs.autocast(dd.device):
            preds.append(model(dd.prepare(x[i : i + batch], False, None, cl)).argmax(1))
    return torch.cat(preds)


def balanced_acc(logits_or_pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall in % from logits (N, C) or predicted classes (N,)."""
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    recall = per_class_recall(pred.cpu().numpy(), labels.cpu().numpy(), num_classes)
    return float(np.nanmean(recall) * 100)


def evaluate(model: Network, dd: DeviceData, cfg: dict[str, Any], knobs: Knobs | None = None) -> dict[str, Any]:
    """FDR of train and test features and Many/Medium/Few/avg test accuracy per LA variant.

    LA is post hoc: tau and gamma are chosen on the validation logits of this very model and
    applied to its test logits; nothing is retrained. The logits needed to redo this are kept."""
    data, c, eb = dd.data, dd.data.num_classes, cfg["eval_batch_size"]
    train_feats, _ = features_and_logits(model, dd, "train", eb, augment=cfg["fdr_train_augment"], seed=1,
                                         knobs=knobs)
    test_feats, test_logits = features_and_logits(model, dd, "test", eb, knobs=knobs)
    _, val_logits = features_and_logits(model, dd, "val", eb, knobs=knobs)
    y_train, y_val, y_test = (dd.y[s].cpu().numpy() for s in ("train", "val", "test"))
    weight = model.classifier.weight.detach().float().cpu()
    bias = model.classifier.bias
    bias_np = bias.detach().float().cpu().numpy() if bias is not None else np.zeros(c, dtype=np.float32)
    norms = weight.norm(dim=1).numpy()
    prior, groups = data.prior, data.groups()
    arrays = {
        "val_logits": val_logits.numpy(), "val_labels": y_val, "test_logits": test_logits.numpy(),
        "test_labels": y_test, "bias": bias_np, "weight_norms": norms, "prior": prior,
        "class_counts": np.asarray(data.class_counts),
    }
    in_average = classes_in_average(y_test, c, data.name)
    la_results: dict[str, dict[str, Any]] = {}
    for la in LA_KINDS:  # all of them, whatever cfg["la"] reports: the model folder serves every spec
        grid = cfg["tau_grid"] if la == "add" else cfg["gamma_grid"] if la == "mult" else None
        grid = grid or default_grid(la)
        kw = dict(bias=bias_np, weight_norms=norms, mult_form=cfg["la_mult_form"])
        param, val_acc = tune_la(arrays["val_logits"], y_val, la, prior, grid=grid, num_classes=c, **kw)
        adjusted = adjust_logits(arrays["test_logits"], la, param or 0.0, prior, **kw)
        recall = per_class_recall(adjusted.argmax(1), y_test, c)
        la_results[la] = {"param": param, "val_acc": val_acc, **group_accuracy(recall, groups),
                          "acc_per_class": [float(r * 100) for r in recall]}
    return {
        "fdr_train": fdr(train_feats.numpy().astype(np.float64), y_train, c),
        "fdr_test": fdr(test_feats.numpy().astype(np.float64), y_test, c),
        "la": la_results,
        "objective": objective({"la": la_results}, cfg["la"]),
        "classes_in_average": in_average,
        "_arrays": arrays,
    }


def classes_in_average(labels: np.ndarray, num_classes: int, dataset: str) -> int:
    """How many classes the test accuracies (Many/Medium/Few, the average) are averaged over: those
    with at least one test image. A class the test split lacks has no recall; it is left out of
    the averages, and said in one warning naming it (the trial reports it: the sweep's progress
    output, the model's ``warnings.log`` and its MLflow run's ``wbsweep.warnings``)."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    absent = [int(k) for k in np.flatnonzero(counts == 0)]
    if absent:
        which = ", ".join(map(str, absent))
        warnings.warn(f"the {dataset} test split has no image of class {which}: the test accuracies (Many/Medium/"
                      f"Few, Average) are averaged over {num_classes - len(absent)} of {num_classes} classes "
                      "(classes_in_average in metrics.json and results/)", UserWarning, stacklevel=2)
    return num_classes - len(absent)
