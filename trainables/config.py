"""The one dictionary of hyperparameters that fully describes a training run, and its hash.

Everything the trainer does is read from this dictionary (airbench style), so the saved config is
enough to say what produced a result. ``config_hash`` covers the keys that change the science and
leaves out where things live (paths, device, threads), so the same experiment on another machine
has the same hash and finished work is never run twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from typing import Any

from trainables.errors import WbsweepError

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "digits-lt",
    "rho": None,  # None: the dataset's default imbalance ratio
    "val_per_class": 20,
    "split": "file",  # file: test = the official test set | pooled: the authors' MNIST split (trainables/data.py)
    "augment": "auto",  # auto: the dataset's own (crop_flip for CIFAR, none for MNIST/digits) | none | crop_flip
    "data_fingerprint": None,  # the split's content (trainables/data.py data_fingerprint), set by the sweep
    # model
    "model": "mlp3",
    "width": None,  # None: the model's own width (1024 for MLPs, 16/64 for ResNets)
    "classifier": "linear",  # linear | etf
    "etf_bias": True,  # the authors' code adds a learnable, weight-decayed bias to the ETF head
    # loss and regularisation
    "loss": "ce",  # ce | cb | dr
    "cb_beta": 0.9999,
    "cb_form": "softmax",  # softmax (seed code, paper eq. 8) | bce (WB's code)
    "wd": 0.0,  # lambda, coupled L2 (SGD weight_decay)
    "wd_scope": "all",  # all | conv_only ("WD w/o BN") | no_bn_shift ("WD w/o shift")
    "conv_only_linear": False,  # conv_only also decays linear layers' weights and biases, classifier included (code)
    "bn": "trainable",  # trainable | fixed
    "bn_scale": 0.1,  # the common BN scale when bn == fixed
    "fr": 0.0,  # zeta of feature regularisation
    # optimisation (paper appendix 7.5.3)
    "epochs": 320,
    "batch_size": 64,
    "lr": 0.01,
    "momentum": 0.9,
    "select": "best_val",  # best_val (the authors' code keeps the best validation epoch) | last
    "lr_step": "epoch_end",  # when the cosine schedule steps: epoch_end | epoch_start (authors: lr(1) .. lr(T) = 0)
    "precision": "fp32",  # fp32 | bf16: autocast convolutions and matmuls to bfloat16 (BN and the loss stay fp32)
    # WB's second stage (classifier only, CB loss, MaxNorm), from the parent's checkpoint
    "stage2": False,
    "stage2_epochs": 10,
    "stage2_wd": 0.1,
    "stage2_loss": "cb",
    "maxnorm": "iter",  # iter (paper) | epoch (authors' code) | none
    "maxnorm_alpha": 0.1,
    "stage2_init_norm": False,  # scale classifier rows to unit norm before stage 2 ("WD&Norm&CB", figure 6)
    "parent_hash": None,  # config hash of the stage-1 run (set by the orchestrator)
    # evaluation
    "la": ["none", "add", "mult"],
    "la_mult_form": "paper",  # paper (eq. 9: normalise weight norms, then scale) | code (scale logits)
    "tau_grid": None,  # None: the paper's grid 1.00, 1.05, ..., 2.00
    "gamma_grid": None,  # None: the paper's grid 0.00, 0.05, ..., 1.00
    "fdr_train_augment": True,  # the authors' "train FDR" uses augmented train images (eval mode)
    "track_forgetting": False,  # record forgetting events per training image (figure 4): forgetting.npz
    "analyses": [],  # analyses computed from the trained model (trainables/analysis.py): ANALYSES
    # where and how (not part of the hash)
    "seed": 0,
    "data_root": None,
    "device": "auto",  # auto | cpu | cuda
    "threads": None,  # torch threads; None leaves torch's default
    "eval_batch_size": 1024,
    "channels_last": True,  # NHWC memory layout for convolutional models (faster convolutions, same math)
    "compile": "auto",  # auto | off | torch | cudagraph | cudagraph+torch; auto: runner.py Knobs.resolve
    "checkpoint_seconds": 60.0,  # save a resumable checkpoint at most this often (0: every epoch)
    "init_from": None,  # path of the parent's model.pt for stage 2
}

CHOICES: dict[str, tuple] = {
    "classifier": ("linear", "etf"),
    "loss": ("ce", "cb", "dr"),
    "cb_form": ("softmax", "bce"),
    "wd_scope": ("all", "conv_only", "no_bn_shift"),
    "bn": ("trainable", "fixed"),
    "select": ("best_val", "last"),
    "lr_step": ("epoch_end", "epoch_start"),
    "split": ("file", "pooled"),
    "augment": ("auto", "none", "crop_flip", "resized_crop_flip"),
    "stage2_loss": ("ce", "cb"),
    "maxnorm": ("iter", "epoch", "none"),
    "la_mult_form": ("paper", "code"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16"),
    "compile": ("auto", "off", "torch", "cudagraph", "cudagraph+torch"),
}

LA_KINDS = ("none", "add", "mult")
#: What trainables/analysis.py computes from a finished run (names of the option ``analyses``).
ANALYSES = ("fdr_random_layer", "class_cosine", "relu_fdr", "feature_norms", "forgetting", "weight_norms")

# Keys that say where or how fast, not what: excluded from the hash.
# The speed knobs channels_last, compile and eval_batch_size only change how the same arithmetic is
# scheduled (memory layout, kernel fusion, a replayed CUDA graph of the same kernels, evaluation batch
# size in eval mode): results agree to float32 rounding, like two runs of cuDNN's nondeterministic
# kernels (tests/test_speed.py, bench/gpu_check.sh). precision changes the arithmetic (bf16 rounds
# every product to 8 bits of mantissa), so it is hashed.
# ``la`` (which post-hoc logit adjustments a spec reports) does not change the model: every run
# evaluates all of LA_KINDS, and a spec's rows and objective use its own list, so Table 2's "wd"
# (no LA) and Table 4's "wd" (three LA variants) share one trained model.
NOT_HASHED = frozenset(
    {"seed", "data_root", "device", "threads", "eval_batch_size", "init_from", "checkpoint_seconds", "analyses",
     "channels_last", "compile", "la"}
)
# Keys added after results existed are hashed only when set away from their default, so every run
# finished before they existed (all fp32) keeps its hash and is not trained again.
HASHED_WHEN_CHANGED = frozenset({"precision", "stage2_init_norm", "conv_only_linear", "split", "augment", "lr_step",
                                 "data_fingerprint"})
# How each convolutional model is initialised (trainables/models.py): part of the science, so it is
# hashed. Models trained before the initialisation followed the reference implementations (PyTorch's
# default init) hashed without it and are therefore never reused as if trained this way. The MLPs
# kept PyTorch's default init (the authors' BNMLP), so their hashes did not change.
MODEL_INIT = {"resnet32": "ldam-drw", "resnet34": "torchvision", "resnext50": "torchvision"}

_NUMBER_MIN = {  # inclusive lower bounds of numeric keys
    "wd": 0.0, "fr": 0.0, "bn_scale": 0.0, "stage2_wd": 0.0, "maxnorm_alpha": 0.0, "lr": 0.0,
    "momentum": 0.0, "cb_beta": 0.0, "epochs": 1, "batch_size": 2, "stage2_epochs": 1,
    "val_per_class": 1, "eval_batch_size": 1, "rho": 1.0, "checkpoint_seconds": 0.0,
    "width": 1, "threads": 1, "seed": 0,
}


_COUNTS = frozenset({"epochs", "batch_size", "stage2_epochs", "val_per_class", "eval_batch_size", "width", "threads",
                     "seed"})
_PATHS = ("data_root", "init_from", "parent_hash", "data_fingerprint")  # None or a string


def is_number(value: Any) -> bool:
    """A finite real number; true/false are not (YAML's ``yes`` must not pass for 1)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def resolve_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS updated with ``overrides``, checked: unknown keys, bad choices and out-of-range
    numbers raise :class:`WbsweepError` naming the key (a typo must not silently do nothing)."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise WbsweepError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}.")
    cfg = {**DEFAULTS, **overrides}
    if cfg["compile"] is False:  # YAML reads a bare `off` as false
        cfg["compile"] = "off"
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise WbsweepError(f"option {key}={cfg[key]!r} is not one of {', '.join(allowed)}.")
    for key, low in _NUMBER_MIN.items():
        value = cfg[key]
        if value is None and DEFAULTS[key] is None:
            continue
        if not is_number(value):
            raise WbsweepError(f"option {key} must be a finite number, got {value!r}.")
        if key in _COUNTS:
            if value != int(value):
                raise WbsweepError(f"option {key} must be a whole number, got {value!r}.")
            cfg[key] = int(value)
        elif not isinstance(value, (int, float)):  # a numpy scalar: a plain float, so it hashes as a number
            cfg[key] = float(value)
        if value < low:
            raise WbsweepError(f"option {key}={value} is below its minimum {low}.")
    if isinstance(cfg["la"], str):
        cfg["la"] = [cfg["la"]]
    bad = [x for x in cfg["la"] if x not in LA_KINDS]
    if bad or not cfg["la"]:
        raise WbsweepError(f"option la={cfg['la']!r}: each entry must be one of {', '.join(LA_KINDS)}.")
    analyses = [cfg["analyses"]] if isinstance(cfg["analyses"], str) else cfg["analyses"]
    if not isinstance(analyses, (list, tuple)) or any(a not in ANALYSES for a in analyses):
        raise WbsweepError(f"option analyses={cfg['analyses']!r}: a list of {', '.join(ANALYSES)}.")
    cfg["analyses"] = list(dict.fromkeys(analyses))
    if "forgetting" in cfg["analyses"] and not cfg["track_forgetting"]:
        raise WbsweepError("analysis 'forgetting' needs the per-epoch predictions: set track_forgetting: true.")
    if cfg["stage2"] and not cfg["init_from"]:
        raise WbsweepError("a second-stage (WB) run needs init_from: the stage-1 model.pt to start from.")
    for key in ("tau_grid", "gamma_grid"):
        grid = cfg[key]
        if grid is not None and (not isinstance(grid, (list, tuple)) or not grid or not all(map(is_number, grid))):
            raise WbsweepError(f"option {key} must be a list of numbers, e.g. [1.0, 1.5, 2.0], got {grid!r}.")
    for key in _PATHS:
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise WbsweepError(f"option {key} must be a path or name (a string), got {cfg[key]!r}.")
    for key, default in DEFAULTS.items():  # a switch given as "yes" or 1 would silently read as on
        if isinstance(default, bool) and not isinstance(cfg[key], bool):
            raise WbsweepError(f"option {key} must be true or false, got {cfg[key]!r}.")
    return cfg


def objective(metrics: dict[str, Any], la: list[str]) -> float:
    """The tune stages' objective for a method reporting the LA variants ``la``: the best validation
    balanced accuracy among them (each with its tau/gamma chosen on validation)."""
    return max(metrics["la"][k]["val_acc"] for k in la)


def config_hash(cfg: dict[str, Any]) -> str:
    """A short, stable hash of the keys that define the experiment (sorted JSON, sha256)."""
    science = {k: v for k, v in cfg.items()
               if k not in NOT_HASHED and not (k in HASHED_WHEN_CHANGED and v == DEFAULTS[k])}
    if cfg.get("model") in MODEL_INIT:
        science["init"] = MODEL_INIT[cfg["model"]]
    blob = json.dumps(science, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
