"""Tests of the training config (validation, hash) and of the methods as presets of knobs."""

from __future__ import annotations

import math
from typing import Any

import pytest

from trainables.config import DEFAULTS, config_hash, resolve_config
from trainables.errors import WbsweepError
from trainables.methods import METHODS, get_method, method_config

# --- resolve_config ------------------------------------------------------------------------------


def test_defaults_resolve_unchanged() -> None:
    cfg = resolve_config({})
    assert cfg == DEFAULTS
    assert cfg is not DEFAULTS
    cfg = resolve_config({"wd": 0.01, "la": "add"})
    assert cfg["wd"] == 0.01
    assert cfg["la"] == ["add"]  # a single LA kind is accepted as a string
    assert DEFAULTS["wd"] == 0.0 and DEFAULTS["la"] == ["none", "add", "mult"]  # not mutated


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"epochz": 3}, "epochz"),  # unknown key
        ({"loss": "xx"}, "loss"),  # bad choice
        ({"maxnorm": "always"}, "maxnorm"),
        ({"wd": -0.001}, "wd"),  # below its minimum
        ({"lr": -1.0}, "lr"),
        ({"epochs": "10"}, "epochs"),  # not a number
        ({"epochs": True}, "epochs"),  # a bool is not a number here
        ({"batch_size": 1}, "batch_size"),  # BatchNorm needs 2
        ({"la": ["none", "mul"]}, "la"),
        ({"stage2": True}, "init_from"),  # stage 2 needs the stage-1 checkpoint
    ],
)
def test_resolve_config_errors_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(WbsweepError) as info:
        resolve_config(overrides)
    assert key in str(info.value)


def test_resolve_config_unknown_key_lists_known() -> None:
    with pytest.raises(WbsweepError) as info:
        resolve_config({"wieght_decay": 0.1})
    msg = str(info.value)
    assert "wieght_decay" in msg and "stage2_wd" in msg


def test_rho_may_stay_none_but_not_below_one() -> None:
    assert resolve_config({"rho": None})["rho"] is None
    assert resolve_config({"rho": 50})["rho"] == 50
    with pytest.raises(WbsweepError, match="rho"):
        resolve_config({"rho": 0.5})


@pytest.mark.parametrize("key", ["epochs", "batch_size", "stage2_epochs"])
def test_count_options_must_be_whole_numbers(key: str) -> None:
    with pytest.raises(WbsweepError, match=key):
        resolve_config({key: 2.5})
    # 4.0 (from YAML or a float search) is a whole number: accepted and made an int for range()
    value = resolve_config({key: 4.0})[key]
    assert value == 4 and isinstance(value, int)


@pytest.mark.parametrize("key", ["wd", "lr"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_inf_are_rejected(key: str, value: float) -> None:
    with pytest.raises(WbsweepError, match=key):
        resolve_config({key: value})


# --- config_hash ---------------------------------------------------------------------------------


def test_config_hash_ignores_where_and_how() -> None:
    base = config_hash(resolve_config({}))
    assert len(base) == 16 and int(base, 16) >= 0
    for over in ({"seed": 3}, {"data_root": "/somewhere/else"}, {"device": "cpu"}, {"threads": 4},
                 {"seed": 7, "device": "cuda", "threads": 1, "data_root": "/x"},
                 {"la": ["none"]}, {"la": ["mult", "add"]}):  # post-hoc: every run evaluates all LA kinds
        assert config_hash(resolve_config(over)) == base, over


def test_config_hash_changes_with_the_science() -> None:
    base = config_hash(resolve_config({}))
    changed = [
        {"wd": 0.005},
        {"wd": 0.0051},
        {"tau_grid": [1.0, 2.0]},
        {"dataset": "cifar10-lt"},
        {"model": "mlp4"},
    ]
    hashes = [config_hash(resolve_config(c)) for c in changed]
    assert base not in hashes
    assert len(set(hashes)) == len(hashes)


def test_config_hash_is_independent_of_key_order() -> None:
    cfg = resolve_config({"wd": 0.01})
    assert config_hash(dict(reversed(list(cfg.items())))) == config_hash(cfg)


# --- methods -------------------------------------------------------------------------------------

HYPER = {"wd": 0.005, "fr": 0.01, "stage2_wd": 0.1, "bn_scale": 0.05}


def test_method_configs() -> None:
    cfg = {name: method_config(m, HYPER) for name, m in METHODS.items()}
    assert cfg["naive"]["wd"] == 0.0 and cfg["naive"]["loss"] == "ce"
    assert cfg["cb"]["wd"] == 0.0 and cfg["cb"]["loss"] == "cb"
    assert cfg["wd"]["wd"] == 0.005
    assert cfg["wd_cb"]["wd"] == 0.005 and cfg["wd_cb"]["loss"] == "cb"
    assert cfg["wd_fr_etf"]["fr"] == 0.01 and cfg["wd_fr_etf"]["classifier"] == "etf"
    assert cfg["wd_fr_etf"]["wd"] == 0.005
    assert cfg["wd_etf"]["classifier"] == "etf" and cfg["wd_etf"].get("fr", 0.0) == 0.0
    assert cfg["wd_nobn"]["wd_scope"] == "conv_only" and cfg["wd_nobn"].get("bn", "trainable") == "trainable"
    assert cfg["wd_fixbn"]["bn"] == "fixed" and cfg["wd_fixbn"]["bn_scale"] == 0.05
    assert cfg["wd_fixbn"]["wd_scope"] == "conv_only"
    assert cfg["wb"]["stage2_wd"] == 0.1 and cfg["wb"]["stage2"] is True
    assert cfg["wd_etf_dr"]["loss"] == "dr" and cfg["wd_etf_dr"]["classifier"] == "etf"
    # methods without WD never get a lambda, whatever the preset says
    for name in ("naive", "cb"):
        assert cfg[name]["wd"] == 0.0
    # only stage-1 methods with FR get a zeta
    assert [n for n, c in cfg.items() if c.get("fr", 0.0) > 0] == ["wd_fr_etf"]
    # every stage-1 method config is a valid training config
    for name, c in cfg.items():
        if METHODS[name].parent is None:  # second stages (wb, wd_norm_cb) need their parent's model
            resolved = resolve_config(c)
            assert {k: resolved[k] for k in c} == c


def test_method_config_follows_hyper() -> None:
    assert method_config(get_method("wd"), {"wd": 0.02})["wd"] == 0.02
    assert method_config(get_method("wb"), {"stage2_wd": 0.3})["stage2_wd"] == 0.3
    assert method_config(get_method("wd_fixbn"), {"wd": 0.01, "bn_scale": 0.2})["bn_scale"] == 0.2


def test_get_method_suggests() -> None:
    with pytest.raises(WbsweepError, match="Did you mean 'wd_etf'"):
        get_method("wd_eft")


@pytest.mark.parametrize("key", ["fdr_train_augment", "conv_only_linear", "etf_bias", "channels_last"])
def test_a_switch_must_be_true_or_false(key: str) -> None:
    with pytest.raises(WbsweepError, match=key):
        resolve_config({key: "yes"})
    assert resolve_config({key: False})[key] is False


@pytest.mark.parametrize(("key", "value"), [("width", "abc"), ("width", 0), ("width", 2.5), ("threads", "abc"),
                                            ("seed", "abc"), ("seed", -1), ("tau_grid", "abc"), ("tau_grid", []),
                                            ("gamma_grid", [0.1, "x"]), ("init_from", 3)])
def test_options_of_the_wrong_type_are_named(key: str, value: Any) -> None:
    """Each of these used to pass and crash the trial later (TypeError/ValueError in the trainer)."""
    with pytest.raises(WbsweepError, match=key):
        resolve_config({key: value})


def test_optional_numbers_may_stay_unset() -> None:
    cfg = resolve_config({"width": None, "threads": None, "tau_grid": [1, 1.5], "seed": 3.0})
    assert cfg["width"] is None and cfg["threads"] is None and cfg["seed"] == 3 and isinstance(cfg["seed"], int)
