"""Analyses of a trained model (the paper's Table 3 and Figures 1-6), computed from its checkpoint.

Every analysis is a pure function of features, labels or weights (numpy/torch, no files), and
:func:`run_analyses` applies the requested ones to a finished run folder: it loads ``model.pt``
(``{"model": state_dict, "config": cfg}``), rebuilds the model and the data from the saved config,
and writes ``analysis.json`` (the numbers) and one PNG per analysis next to the model (drawn by
trainables/plots.py). So an analysis can be (re)computed at any time without retraining
(``wbsweep analyze``).

=================  ========================  ===============================================
name               paper                     what
=================  ========================  ===============================================
fdr_random_layer   Table 3                   FDR of the features before and after an untrained
                                             Linear(d, d) (weight, bias ~ U(-1/sqrt d, 1/sqrt d))
                                             + ReLU, on test (the table's split) and train
class_cosine       Figures 1, 5 (right)      mean cosine similarity of train features for each
                                             pair of classes (C x C)
relu_fdr           Figure 2                  FDR of ReLU(output) of every layer of the backbone
                                             (Linear/Conv, BN, residual block), trained and at
                                             initialisation, on test
feature_norms      Figures 3, 5 (left)       norm of the per-class mean train feature
forgetting         Figure 4                  forgetting scores per class (Toneva et al. 2019)
                                             from the per-epoch train predictions
weight_norms       Figure 6                  classifier row norms and their ratio to the row
                                             of the class with the most training images
=================  ========================  ===============================================

"Train features" are those of the un-augmented training images in eval mode (the classifier's
input, ``model.backbone(x)``). Intermediate layers are read with forward hooks; the models'
``forward`` is not changed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.config import ANALYSES
from trainables.errors import WbsweepError
from trainables.metrics import fdr
from trainables.plots import plot_run

RESULT_FILE = "analysis.json"


# --- pure functions ------------------------------------------------------------------------------


def random_layer(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (d, d) and bias (d,) of Table 3's untrained layer, both ~ U(-1/sqrt(d), 1/sqrt(d))
    (appendix 7.6.2), drawn from a local generator seeded with ``seed``."""
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(d)
    weight = (torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    bias = (torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return weight, bias


def fdr_random_layer(features: Any, labels: Any, num_classes: int | None = None, seed: int = 0) -> dict[str, float]:
    """Table 3: FDR of ``features`` ("before") and of ReLU(W f + b) with :func:`random_layer` ("after")."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    w, b = random_layer(x.shape[1], seed)
    after = torch.relu(x @ w.T + b)
    return {"before": fdr(x.numpy(), labels, num_classes), "after": fdr(after.numpy(), labels, num_classes)}


def class_cosine_matrix(features: Any, labels: Any, num_classes: int) -> np.ndarray:
    """(C, C): entry (i, j) is the mean of cos(f_a, f_b) over train features a of class i and b of
    class j. Off the diagonal this is the dot product of the two classes' mean unit features; on
    the diagonal the pairs of a feature with itself are left out (mean over a != b). A class
    without samples (or, on the diagonal, with one) gives nan. Zero features count as cosine 0."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, unit)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
        out = means @ means.T
        self_dots = np.bincount(y, weights=np.sum(unit * unit, axis=1), minlength=num_classes)
        diag = (np.sum(sums * sums, axis=1) - self_dots) / (counts * (counts - 1))
    np.fill_diagonal(out, np.where(counts > 1, diag, np.nan))
    out[counts == 0, :] = np.nan
    out[:, counts == 0] = np.nan
    return out


def class_mean_norms(features: Any, labels: Any, num_classes: int) -> np.ndarray:
    """||mu_k||: the norm of the mean feature of each class (nan for a class without samples)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.linalg.norm(sums / counts[:, None], axis=1)


def forgetting_from_history(correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Forgetting events and ever-correct flags from a (T, N) history of per-presentation
    correctness (row t: was image n classified correctly the t-th time it was seen). An event is a
    correct -> incorrect transition between consecutive presentations; this is what training
    records online (``track_forgetting``)."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2:
        raise ValueError(f"correct must be (presentations, images), got shape {c.shape}")
    events = np.sum(c[:-1] & ~c[1:], axis=0) if len(c) > 1 else np.zeros(c.shape[1], dtype=np.int64)
    return events.astype(np.int64), c.any(axis=0)


def forgetting_scores(events: Any, ever_correct: Any, labels: Any, num_classes: int) -> dict[str, np.ndarray]:
    """Forgetting scores (Toneva et al. 2019) aggregated per class.

    A forgetting event is an epoch where a training image that was classified correctly (in its
    mini-batch, during training) is misclassified the next time it is seen; an image's score is
    its number of events, and an image never classified correctly counts as forgotten infinitely
    often. Per class this returns ``mean``: the mean score over the images that were learned at
    least once (finite scores only), ``never_learned``: the fraction of the class's images never
    learned (infinite score), ``unforgettable``: the fraction learned and never forgotten, and
    ``count``: images per class. nan where a class has no (learned) images.
    """
    ev = np.asarray(events, dtype=np.float64)
    ok = np.asarray(ever_correct, dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    if not (ev.shape == ok.shape == y.shape):
        raise ValueError(f"events, ever_correct and labels must have one entry per image: "
                         f"{ev.shape}, {ok.shape}, {y.shape}")
    count = np.bincount(y, minlength=num_classes).astype(np.float64)
    learned = np.bincount(y, weights=ok.astype(np.float64), minlength=num_classes)
    ev_sum = np.bincount(y, weights=np.where(ok, ev, 0.0), minlength=num_classes)
    never_forgot = np.bincount(y, weights=(ok & (ev == 0)).astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "mean": np.where(learned > 0, ev_sum / learned, np.nan),
            "never_learned": np.where(count > 0, (count - learned) / count, np.nan),
            "unforgettable": np.where(count > 0, never_forgot / count, np.nan),
            "count": count,
        }


def weight_norm_ratio(weight: Any, class_counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row norms ||w_k|| of a (C, d) classifier weight and their ratio to the row of the class with
    the most training images (figure 6's vertical axis)."""
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight, dtype=np.float64)
    norms = np.linalg.norm(w, axis=1)
    top = int(np.argmax(np.asarray(class_counts)))
    return norms, norms / norms[top]


def hooked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs figure 2 measures: every Linear/Conv, BN and residual block of the
    backbone (qualified name, module), in registration order (execution order is what the hooks see)."""
    from trainables.models import BN_TYPES, residual_blocks

    kinds = (nn.Linear, nn.Conv2d, *BN_TYPES, *residual_blocks())
    return [(name, m) for name, m in model.backbone.named_modules() if name and isinstance(m, kinds)]


@torch.no_grad()
def layer_outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Output of every :func:`hooked_layers` layer for the inputs ``batches`` (eval mode), in
    execution order, as CPU float tensors (N, d); convolution outputs are averaged over space."""
    model.eval()
    layers = hooked_layers(model)
    seen: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []

    def hook(name: str):
        def fn(module, inputs, output):
            out = output.float()
            if out.dim() > 2:
                out = out.mean(dim=tuple(range(2, out.dim())))
            if name not in seen:
                seen[name] = []
                order.append(name)
            seen[name].append(out.cpu())
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        for x in batches:
            model.backbone(x)
    finally:
        for h in handles:
            h.remove()
    kinds = {name: type(m).__name__ for name, m in layers}
    return [(f"{name}:{kinds[name]}", torch.cat(seen[name])) for name in order]


def relu_fdr(layer_features: Sequence[tuple[str, Any]], labels: Any, num_classes: int | None = None) -> list[float]:
    """Figure 2's ReLU-FDR: FDR of ReLU(output) of each layer; one value per layer."""
    out = []
    for _, feats in layer_features:
        x = torch.relu(torch.as_tensor(np.asarray(feats), dtype=torch.float64)).numpy()
        out.append(fdr(x, labels, num_classes))
    return out


# --- one finished run ------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: numpy to lists and floats, nan to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_result(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def missing_analyses(run_dir: str | Path, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that ``analysis.json`` neither holds nor records as not applicable."""
    result = load_result(run_dir)
    done = {**result.get("analyses", {}), **result.get("skipped", {})}
    return [n for n in names if n not in done]


class _Context:
    """A finished run rebuilt from its checkpoint: config, data on the device, model."""

    def __init__(self, run_dir: Path, device: str, data_root: str | None):
        from trainables.config import DEFAULTS
        from trainables.device_data import DeviceData
        from trainables.models import ModelSpec, build_model
        from trainables.run_files import load_model_file, retrain_hint
        from trainables.train import config_dataset, pick_device

        path = run_dir / "model.pt"
        if not path.exists():
            raise WbsweepError(f"{run_dir} has no model.pt: the run did not finish; train it first.")
        state = load_model_file(path)
        if not isinstance(state.get("config"), dict):
            raise WbsweepError(f"{path} holds no config (not a finished run's model.pt); "
                               f"{retrain_hint(run_dir)}.")
        cfg = {**DEFAULTS, **state["config"]}  # a run of an older version lacks newer keys
        self.cfg = cfg
        self.analyses = list(state["config"].get("analyses") or [])
        root = data_root if data_root is not None else cfg.get("data_root")
        if root is not None and not Path(root).is_dir():
            root = None  # trained elsewhere: fall back to the default data root
        self.data = config_dataset({**cfg, "data_root": root})
        self.device = pick_device(device)
        self.dd = DeviceData(self.data, self.device, cfg["augment"])
        self.spec = ModelSpec(cfg["model"], self.data.num_classes, self.data.x_train.shape[1],
                              self.data.x_val.shape[-1], cfg["classifier"], cfg["etf_bias"], cfg["width"],
                              etf_seed=cfg["seed"])
        self.model = build_model(self.spec).to(self.device)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError:  # resnet34/resnext50 became torchvision's modules (names conv1, layer1, ...)
            raise WbsweepError(f"{path} was saved by an earlier wbsweep whose {cfg['model']} had other module names "
                               "(and PyTorch's default initialisation): run its spec again to train it the "
                               "current way.") from None
        self.model.eval()
        self.batch = int(cfg.get("eval_batch_size") or 1024)
        self._feats: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = {}

    def features(self, split: str, augment: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Classifier-input features (eval mode) and labels of a split; ``augment`` draws the
        crops and flips as the trainer's train FDR does (same seed), so both see the same images."""
        from trainables.evaluation import features_and_logits

        key = (split, augment)
        if key not in self._feats:
            f, _ = features_and_logits(self.model, self.dd, split, self.batch, augment=augment, seed=1)
            self._feats[key] = (f.numpy().astype(np.float64), self.dd.y[split].cpu().numpy())
        return self._feats[key]

    def batches(self, split: str) -> list[torch.Tensor]:
        x = self.dd.x[split]
        gen = torch.Generator(device=self.device)
        return [self.dd.prepare(x[i : i + self.batch], False, gen) for i in range(0, len(x), self.batch)]

    def untrained_model(self) -> nn.Module:
        """The model at initialisation, as ``train`` built it (same seed, same fixed BN)."""
        from trainables.models import build_model, fix_batchnorm_

        torch.manual_seed(self.cfg["seed"])
        model = build_model(self.spec)
        if self.cfg["bn"] == "fixed":
            fix_batchnorm_(model, self.cfg["bn_scale"])
        return model.to(self.device).eval()


def _compute(name: str, ctx: _Context, run_dir: Path) -> dict[str, Any] | str:
    """The numbers of one analysis, or a string saying why it does not apply to this run."""
    c = ctx.data.num_classes
    if name == "fdr_random_layer":
        out = {}
        for split in ("test", "train"):  # train as the run's fdr_train: augmented or not (fdr_train_augment)
            f, y = ctx.features(split, augment=split == "train" and bool(ctx.cfg["fdr_train_augment"]))
            r = fdr_random_layer(f, y, c, seed=ctx.cfg["seed"])
            out[f"before_{split}"], out[f"after_{split}"] = r["before"], r["after"]
        return out
    if name == "class_cosine":
        f, y = ctx.features("train")
        return {"matrix": class_cosine_matrix(f, y, c)}
    if name == "feature_norms":
        f, y = ctx.features("train")
        return {"norms": class_mean_norms(f, y, c)}
    if name == "relu_fdr":
        y = ctx.dd.y["test"].cpu().numpy()
        batches = ctx.batches("test")
        trained = layer_outputs(ctx.model, batches)
        untrained = layer_outputs(ctx.untrained_model(), batches)
        return {"split": "test", "layers": [label for label, _ in trained], "trained": relu_fdr(trained, y, c),
                "untrained": relu_fdr(untrained, y, c)}
    if name == "forgetting":
        path = run_dir / "forgetting.npz"
        if not path.exists():
            return ("no forgetting.npz: the run was trained without track_forgetting"
                    + (" (a second stage does not record it)" if ctx.cfg["stage2"] else ""))
        try:
            with np.load(path) as z:
                events, ever, labels = z["events"], z["ever_correct"], z["labels"]
        except Exception as exc:  # noqa: BLE001 - a torn zip or a foreign file: name it, in one line
            from trainables.run_files import one_line, retrain_hint

            raise WbsweepError(f"{path} is torn or not a wbsweep forgetting file ({one_line(exc)}); "
                               f"{retrain_hint(run_dir)}.") from None
        scores = forgetting_scores(events, ever, labels, c)
        return {**scores, "epochs": ctx.cfg["epochs"]}
    if name == "weight_norms":
        norms, ratio = weight_norm_ratio(ctx.model.classifier.weight, ctx.data.class_counts)
        return {"norms": norms, "ratio": ratio}
    raise WbsweepError(f"unknown analysis '{name}'; known: {', '.join(ANALYSES)}.")


def run_analyses(run_dir: str | Path, names: Sequence[str] | None = None, device: str = "cpu",
                 data_root: str | None = None, plots: bool = True) -> dict[str, Any]:
    """Compute ``names`` (default: the run config's ``analyses``) for the finished run in
    ``run_dir``; merge them into its ``analysis.json`` (written atomically) and draw one PNG per
    analysis (``analysis-<name>.png``). Returns the whole merged result."""
    run_dir = Path(run_dir)
    unknown = [n for n in (names or []) if n not in ANALYSES]
    if unknown:
        raise WbsweepError(f"unknown analysis {', '.join(unknown)}; known: {', '.join(ANALYSES)}.")
    ctx = _Context(run_dir, device, data_root)
    if names is None:
        names = ctx.analyses
    result = load_result(run_dir)
    metrics = run_dir / "metrics.json"
    # the folder is named by the config hash too: a torn metrics.json (the sweep retrains that model) need not stop this
    try:
        hash_ = json.loads(metrics.read_text()).get("config_hash") or run_dir.parent.name
    except (OSError, ValueError, AttributeError):
        hash_ = run_dir.parent.name
    result.update({"config_hash": hash_, "seed": ctx.cfg["seed"], "dataset": ctx.data.name,
                   "model": ctx.cfg["model"], "class_counts": list(ctx.data.class_counts),
                   "groups": ctx.data.groups()})
    result.setdefault("analyses", {})
    result.setdefault("skipped", {})
    for name in names:
        value = _compute(name, ctx, run_dir)
        result["skipped"].pop(name, None)
        result["analyses"].pop(name, None)
        if isinstance(value, str):
            result["skipped"][name] = value
        else:
            result["analyses"][name] = _clean(value)
            if plots:
                plot_run(result, name, run_dir / f"analysis-{name}.png")
    tmp = run_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(_clean(result), indent=1))
    os.replace(tmp, run_dir / RESULT_FILE)
    return result


def ensure_run_analyses(run_dir: str | Path, names: Sequence[str], **kw: Any) -> dict[str, Any]:
    """Compute only those of ``names`` that ``analysis.json`` does not hold yet."""
    todo = missing_analyses(run_dir, names)
    return run_analyses(run_dir, todo, **kw) if todo else load_result(run_dir)


def result_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The numbers of an ``analysis.json`` in long format: one dict per value with ``analysis``,
    ``key``, ``i``, ``j`` (class or layer indices, None where not applicable), ``label`` and ``value``."""
    rows: list[dict[str, Any]] = []

    def add(analysis, key, value, i=None, j=None, label=None):
        v = None if value is None else float(value)
        rows.append({"analysis": analysis, "key": key, "i": i, "j": j, "label": label, "value": v})

    counts = result.get("class_counts") or []
    for name, r in (result.get("analyses") or {}).items():
        if name == "fdr_random_layer":
            for key, v in r.items():
                add(name, key, v)
        elif name == "class_cosine":
            for i, row in enumerate(r["matrix"]):
                for j, v in enumerate(row):
                    add(name, "cos", v, i, j)
        elif name == "relu_fdr":
            for which in ("trained", "untrained"):
                for i, (label, v) in enumerate(zip(r["layers"], r[which], strict=True)):
                    add(name, which, v, i, None, label)
        else:
            for key, values in r.items():
                if isinstance(values, list):
                    for i, v in enumerate(values):
                        add(name, key, v, i, None, None)
                elif isinstance(values, (int, float)):
                    add(name, key, values)
        if name in ("feature_norms", "forgetting", "weight_norms"):
            for i, n in enumerate(counts):
                add(name, "class_count", n, i)
    return rows
