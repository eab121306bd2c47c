"""Every experiment of the paper as a spec (tables 2-4, 6-10, figures 1-6): each preset loads and plans
positive work, the paper presets say what the paper says, the smoke presets are tiny, and variants
(one spec over several datasets or models) validate like presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wbsweep

from orchestrator.spec.experiment import load_experiment, load_experiments, spec_names
from orchestrator.spec.experiment import stages as plan
from trainables.errors import WbsweepError

PAPER_SPECS = ["table2", "table3", "table4", "table6", "table7", "table8", "table9", "table10",
               "fig1", "fig2", "fig3", "fig4", "fig5", "fig6"]
CASES = [(s, p) for s in PAPER_SPECS for p in ("paper", "cpu", "smoke")]


def test_every_paper_experiment_has_a_spec() -> None:
    assert set(PAPER_SPECS) <= set(spec_names())
    assert spec_names().index("table2") < spec_names().index("table10")  # natural order


@pytest.mark.parametrize(("spec", "preset"), CASES)
def test_each_preset_plans_positive_work(spec: str, preset: str) -> None:
    exps = load_experiments(spec, preset)
    assert exps and all(e.name == spec and e.preset == preset for e in exps)
    for exp in exps:
        stages = plan(exp)
        assert stages and sum(s.trials for s in stages) > 0
        assert {s.entry.method.name for s in stages if s.kind == "repeat"} == {m.method.name for m in exp.methods}


@pytest.mark.parametrize("spec", PAPER_SPECS)
def test_smoke_presets_are_tiny(spec: str) -> None:
    for exp in load_experiments(spec, "smoke"):
        t = exp.train
        assert t["dataset"] in ("digits", "digits-lt")
        assert t.get("epochs", 320) <= 2
        # a second stage (WB, WD&Norm&CB: a method with a parent) trains stage2_epochs more
        second_stages = [m.method.name for m in exp.methods if m.method.parent]
        assert t.get("stage2_epochs", 10) <= 1 or not second_stages, second_stages
        assert exp.trials <= 2 and len(exp.seeds) <= 2
        assert exp.resources.get("gpus_per_trial", 0) == 0


@pytest.mark.parametrize("spec", PAPER_SPECS)
def test_paper_presets_follow_the_paper(spec: str) -> None:
    for exp in load_experiments(spec, "paper"):
        t, h = exp.train, exp.hyper
        assert exp.seeds == [0, 1, 2, 3, 4]
        assert t["epochs"] in (150, 320) and t["batch_size"] == 64 and t["lr"] == 0.01 and t["momentum"] == 0.9
        if t["dataset"].startswith("mnist"):
            assert t["epochs"] == 150 and h["wd"] == 1e-2 and t["model"].startswith(("mlp", "resblock"))
        elif t["dataset"].startswith("mini-imagenet"):
            assert h["wd"] == 3e-3 and t["model"] == "resnet34"
        else:
            assert t["epochs"] == 320 and h["wd"] == 5e-3
            assert t["model"] == ("resnext50" if spec == "table10" else "resnet34")
        if "fr" in h:
            assert h["fr"] == {"cifar10-lt": 0.02, "mini-imagenet-lt": 0.001}.get(t["dataset"], 0.01)
        if any(m.method.name.startswith("wd_fixbn") for m in exp.methods):
            assert exp.search["bn_scale"] == {"grid": [0.01, 0.20, 0.01]} and exp.trials >= 20


def test_paper_datasets_and_models() -> None:
    def sets(spec):
        return [(e.train["dataset"], e.train["model"]) for e in load_experiments(spec, "paper")]

    assert sets("table2") == [("cifar10-lt", "resnet34"), ("cifar100-lt", "resnet34"), ("mini-imagenet-lt", "resnet34")]
    assert sets("table8") == [("cifar10-lt", "resnet34")] and sets("table9") == [("mini-imagenet-lt", "resnet34")]
    assert sets("table10") == [("cifar100-lt", "resnext50")]
    t3 = sets("table3")
    assert {d for d, _ in t3} == {"cifar100", "cifar100-lt", "cifar10", "cifar10-lt", "mini-imagenet",
                                  "mini-imagenet-lt", "mnist"}
    assert {m for d, m in t3 if d == "mnist"} == {"mlp3", "mlp4", "mlp5", "resblock1", "resblock2"}
    assert sets("fig2") == [("mnist", "mlp3"), ("mnist", "mlp4"), ("mnist", "mlp5")]
    assert sets("fig5") == [("mini-imagenet-lt", "resnet34")]
    assert load_experiment("fig4", "paper").train["track_forgetting"] is True
    assert [m.method.name for m in load_experiment("fig2", "paper").methods] == ["naive", "wd", "wd_noshift"]
    assert [m.method.name for m in load_experiment("fig6", "paper").methods] == ["wd", "wb", "wd_norm_cb"]
    layouts = {s: load_experiment(s, "smoke").layout for s in PAPER_SPECS}
    assert layouts["table2"] == "fdr" and layouts["table3"] == "fdr_random_layer"
    assert all(layouts[f"fig{k}"] == "figure" for k in range(1, 7))
    assert all(layouts[t] == "accuracy" for t in ("table4", "table6", "table7", "table8", "table9", "table10"))


def test_variants_merge_over_the_preset(tmp_path: Path) -> None:
    exps = load_experiments("table3", "paper")
    mlp5 = next(e for e in exps if e.variant == "mnist-mlp5")
    assert mlp5.train["model"] == "mlp5" and mlp5.train["analyses"] == ["fdr_random_layer"]  # preset's kept
    assert mlp5.hyper["wd"] == 1e-2 and exps[0].hyper["wd"] == 5e-3
    assert load_experiment("table3", "paper", variant="mnist-mlp5") == mlp5
    assert load_experiment("table3", "paper") == exps[0]
    with pytest.raises(WbsweepError, match="no variant 'mlp9'"):
        load_experiment("table3", "paper", variant="mlp9")


@pytest.mark.parametrize(("variants", "match"), [
    ("[{name: a, train: {epochs: 0}}]", "variant 'a'.*epochs"),
    ("[{name: a, optimiser: sgd}]", "unknown key.*optimiser"),
    ("[{name: a}, {name: a}]", "names must differ"),
    ("{name: a}", "variants must be a list"),
    ("[{name: a, train: {dataset: cifar1000}}]", "cifar1000"),
])
def test_bad_variants_are_reported(tmp_path: Path, variants: str, match: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nmethods: [wd]\npresets:\n  p:\n    variants: {variants}\n")
    with pytest.raises(WbsweepError, match=match):
        load_experiments(str(path), "p")


def test_unknown_layout(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nlayout: pie\nmethods: [wd]\npresets: {p: {}}\n")
    with pytest.raises(WbsweepError, match="layout 'pie'"):
        load_experiments(str(path))


def test_cli_plan_and_list_show_the_variants(wbsweep_list) -> None:
    proc = wbsweep("run", "table3", "--preset", "paper", "--plan", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "11 variants, 33 stages, 165 trials" in proc.stdout
    assert "variant mnist-resblock2: mnist, resblock2" in proc.stdout
    listing = wbsweep_list.stdout
    specs = listing.splitlines()[0]
    assert all(s in specs for s in PAPER_SPECS)
    for word in ("wd_noshift", "wd_norm_cb", "mini-imagenet-lt", "resnext50", "resblock2"):
        assert word in listing


@pytest.mark.parametrize("spec", PAPER_SPECS)
def test_cli_plan_of_each_spec(spec: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import re

    from orchestrator.cli import main

    for preset in ("paper", "smoke"):
        assert main(["run", spec, "--preset", preset, "--plan", "--out", str(tmp_path / "o")]) == 0
        head = capsys.readouterr().out.splitlines()[0]
        trials = int(re.search(r"(\d+) trials at most", head).group(1))
        assert head.startswith(f"{spec} preset {preset}:") and trials > 0
    assert not (tmp_path / "o").exists()  # planning writes nothing
