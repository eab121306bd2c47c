"""Methods are presets of orthogonal knobs (docs/DESIGN.md section 3), never copies of the training loop.

A method says which knobs it turns on; the numbers (lambda, zeta, ...) come from the spec's preset
and, where the spec searches them, from Optuna. ``searched`` names the knobs a search may touch for
this method, so a method without weight decay never gets a lambda suggested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainables.errors import unknown_name


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # as printed in the paper's tables
    knobs: dict[str, Any] = field(default_factory=dict)
    searched: tuple[str, ...] = ()
    # WB-style second stage: trains only the classifier, starting from the parent method's
    # checkpoint of the same seed.
    parent: str | None = None


def _m(name: str, label: str, searched: tuple[str, ...] = (), parent: str | None = None, **knobs: Any):
    return Method(name, label, knobs, searched, parent)


# "wd": True means "use the preset's lambda"; False means lambda = 0. The same for "fr".
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _m("naive", "Naive", loss="ce", wd=False),
        _m("cb", "CB", loss="cb", wd=False),
        _m("wd", "WD", ("wd",), loss="ce", wd=True),
        _m("wd_cb", "WD&CB", ("wd",), loss="cb", wd=True),
        _m("wb", "WB", ("stage2_wd",), parent="wd", stage2=True),
        _m("wd_etf", "WD&ETF", ("wd",), loss="ce", wd=True, classifier="etf"),
        _m("wd_fr_etf", "WD&FR&ETF", ("wd", "fr"), loss="ce", wd=True, fr=True, classifier="etf"),
        _m("wd_nobn", "WD w/o BN", ("wd",), loss="ce", wd=True, wd_scope="conv_only"),
        _m("wd_fixbn", "WD fixed BN", ("wd", "bn_scale"), loss="ce", wd=True, wd_scope="conv_only", bn="fixed"),
        _m("wd_nobn_etf", "WD w/o BN&ETF", ("wd",), loss="ce", wd=True, wd_scope="conv_only", classifier="etf"),
        _m(
            "wd_fixbn_etf", "WD fixed BN&ETF", ("wd", "bn_scale"),
            loss="ce", wd=True, wd_scope="conv_only", bn="fixed", classifier="etf",
        ),
        _m("wd_etf_dr", "WD&ETF&DR", ("wd",), loss="dr", wd=True, classifier="etf"),
        # Figure 2: WD on everything but the BN shifts ("WD w/o shift")
        _m("wd_noshift", "WD w/o shift", ("wd",), loss="ce", wd=True, wd_scope="no_bn_shift"),
        # Figure 6: WB's second stage with the classifier rows scaled to unit norm before training
        # instead of MaxNorm ("WD + WD&Norm&CB")
        _m("wd_norm_cb", "WD&Norm&CB", ("stage2_wd",), parent="wd", stage2=True, stage2_init_norm=True,
           maxnorm="none"),
    ]
}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    return METHODS[name]


def method_config(method: Method, hyper: dict[str, Any]) -> dict[str, Any]:
    """The training-config overrides of ``method`` given the preset's hyperparameters ``hyper``.

    ``hyper`` holds numbers such as ``wd`` (lambda), ``fr`` (zeta), ``bn_scale``, ``stage2_wd``;
    knobs the method turns off are set to their neutral value so the config (and its hash) says
    exactly what was trained.
    """
    cfg: dict[str, Any] = {}
    for knob, value in method.knobs.items():
        if knob == "wd":
            cfg["wd"] = float(hyper.get("wd", 0.0)) if value else 0.0
        elif knob == "fr":
            cfg["fr"] = float(hyper.get("fr", 0.0)) if value else 0.0
        elif knob == "bn" and value == "fixed":
            cfg["bn"] = "fixed"
            cfg["bn_scale"] = float(hyper.get("bn_scale", 0.1))
        else:
            cfg[knob] = value
    if method.parent is not None:
        cfg["stage2_wd"] = float(hyper.get("stage2_wd", 0.1))
    return cfg
