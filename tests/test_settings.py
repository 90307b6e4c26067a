"""Honest settings (issue 14, item 5): each problem's settings are the sections it declares, a
setting the run would not use is refused (one line, exit 2, nothing written) and left out of
config.json, `train PROBLEM --help` lists every setting with its description, and
`config PROBLEM` writes TOML that `--config` reads back to the same settings."""

from __future__ import annotations

import json
import re

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib

import pytest
from pydantic import BaseModel

import fault_oracles
from blackbox_zo.cli import main
from blackbox_zo.config import (ENGINE_SECTIONS, CGEConfig, ConfigError, EstimatorConfig, EstimatorSettings, RGEConfig,
                                SparsityConfig, SparsitySection, Tagged, TrainConfig, resolve_config, section_model)
from blackbox_zo.config_text import config_toml
from blackbox_zo.problem import OracleProblem, available_problems, get_problem
from blackbox_zo.registry import ESTIMATORS
from problems.digits import DigitsConfig, DigitsProblem

BOWL = fault_oracles.NAME  # a registered oracle with no problem of its own
PROBLEM_NAMES = [*sorted(available_problems()), BOWL]


def leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(leaves(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def unused_candidates(problem) -> list[list[str]]:
    """Settings `problem` (with its defaults) does not use: a section it lacks, an estimator setting of
    another kind, gradient sparsity with an estimator that takes none."""
    model = problem.config_model
    config = problem.resolve_config()
    cases = [[f"{section}.{next(iter(m.model_fields))}=1"] for section, m in ENGINE_SECTIONS.items()
             if section not in model.model_fields]
    other = "estimator.q=4" if "q" not in type(config.estimator).model_fields else "estimator.interp.m=4"
    cases.append([other])
    if "sparsity" in model.model_fields:
        cases.append(["estimator=rge", "sparsity.enabled=true"])
    cases.append(["optimizer=adam", "optimizer.momentum=0.5"])
    return cases


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_every_problem_refuses_a_setting_it_does_not_use(name, tmp_path, capsys):
    problem = get_problem(name)
    cases = unused_candidates(problem)
    assert cases
    for sets in cases:
        argv = ["train", name, "--set", f"run.out_dir={tmp_path}"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 2, sets
        err = capsys.readouterr().err.strip()
        named = sets[-1].split("=")[0]
        assert len(err.splitlines()) == 1 and "setting not used" in err and named in err, (sets, err)
        assert list(tmp_path.iterdir()) == [], "a refused setting must leave nothing behind"


def test_the_refusal_names_the_setting_and_what_is_used_instead():
    p = DigitsProblem()
    with pytest.raises(ConfigError) as exc:
        p.resolve_config(overrides=["estimator.popsize=64"])
    assert str(exc.value) == ("setting not used: estimator.popsize: estimator.kind='subspace-cge' has no popsize "
                              "(its settings: kind, mu, scheme, rank, blocks)")
    with pytest.raises(ConfigError, match=r"sparsity.sparsity: sparsity.enabled=false has no sparsity"):
        p.resolve_config(overrides=["sparsity.enabled=false", "sparsity.sparsity=0.5"])
    with pytest.raises(ConfigError, match=r"estimator.interp.m: estimator.kind='rge' has no interp"):
        p.resolve_config(overrides=["estimator=rge", "estimator.interp.m=4"])
    with pytest.raises(ConfigError, match=r"estimator.mu: estimator.kind='autograd' has no mu"):
        p.resolve_config(overrides=["estimator=autograd", "estimator.mu=0.1"])
    with pytest.raises(ConfigError, match=r"cartpole has no data section \(its sections: estimator, optimizer, "
                                          r"schedule, run, parallel, gym\)"):
        get_problem("cartpole").resolve_config(overrides=["data.batch_size=8"])
    with pytest.raises(ConfigError, match=r"data.seed: cifar10 has no data.seed"):
        get_problem("cifar10").resolve_config(overrides=["data.seed=3"])
    # a typo is still an unknown setting, not an unused one
    with pytest.raises(ConfigError, match=r"invalid config: estimator.typo: Extra inputs are not permitted"):
        p.resolve_config(overrides=["estimator.typo=1"])


def test_a_file_setting_that_is_not_used_is_refused_too(tmp_path):
    (tmp_path / "c.toml").write_text('[estimator]\nkind = "cge"\nq = 8\n')
    with pytest.raises(ConfigError, match="estimator.q: estimator.kind='cge' has no q"):
        DigitsProblem().resolve_config(tmp_path / "c.toml")


def test_the_estimator_section_holds_the_settings_of_its_kind_in_any_order():
    p = DigitsProblem()
    a = p.resolve_config(overrides=["estimator=rge", "estimator.q=28"])
    b = p.resolve_config(overrides=["estimator.q=28", "estimator=rge"])
    assert a.model_dump() == b.model_dump()
    assert isinstance(a.estimator, RGEConfig) and a.estimator.q == 28
    # digits' default is a two-phase preset: its sigma_0 (mu = 0.02) leaves with it, rge starts from mu's default
    assert a.model_dump()["estimator"] == {"kind": "rge", "mu": 0.005, "scheme": "forward", "q": 28,
                                           "distribution": "gaussian"}
    # gradient sparsity is Sparse-CGE: digits' default sparsity does not come along to rge, nor to autograd
    assert a.sparsity is None and "sparsity" not in a.model_dump()
    fo = p.resolve_config(overrides=["estimator=autograd"])
    assert fo.model_dump()["estimator"] == {"kind": "autograd"} and "sparsity" not in fo.model_dump()
    # the optimizer and schedule keep only their kind's settings
    adam = p.resolve_config(overrides=["optimizer=adam", "schedule=constant"])
    assert adam.model_dump()["optimizer"] == {"name": "adam", "lr": 0.1, "weight_decay": 0.0, "betas": (0.9, 0.999)}
    assert adam.model_dump()["schedule"] == {"name": "constant", "warmup_epochs": 0.0}
    # a problem default for another kind is kept for when that kind is chosen: cartpole's RGE q = d = 58
    cartpole = get_problem("cartpole")
    assert "q" not in cartpole.resolve_config().model_dump()["estimator"]
    assert cartpole.resolve_config(overrides=["estimator=rge"]).estimator.q == 58


def test_sparsity_with_an_estimator_that_takes_none_is_refused_by_the_model_itself():
    with pytest.raises(Exception, match="sparsity.enabled=true needs an estimator that takes gradient sparsity"):
        DigitsConfig.model_validate({"estimator": {"kind": "rge"}, "sparsity": {"enabled": True}})
    off = DigitsConfig.model_validate({"estimator": {"kind": "rge"}, "sparsity": {"enabled": False}})
    assert off.sparsity is None  # "off" for an estimator without sparsity is not recorded
    on = DigitsConfig.model_validate({"sparsity": {"enabled": True, "q": 8}})
    assert isinstance(on.sparsity, SparsityConfig) and on.sparsity.q == 8 and isinstance(on.estimator, CGEConfig)


def test_config_json_records_only_the_settings_the_run_uses(tmp_path):
    argv = ["train", "digits", "--set", f"run.out_dir={tmp_path}", "--set", "model.width=2", "--set", "estimator=rge",
            "--set", "estimator.q=4", "--set", "run.max_steps=2", "--set", "run.progress=false",
            "--set", "optimizer=adam"]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "digits").iterdir()
    saved = json.loads((run_dir / "config.json").read_text())
    assert set(saved) == {"problem", "estimator", "optimizer", "schedule", "run", "parallel", "data", "model"}
    assert set(saved["estimator"]) == {"kind", "mu", "scheme", "q", "distribution"}
    assert set(saved["optimizer"]) == {"name", "lr", "weight_decay", "betas"}
    bowl = tmp_path / "bowl"
    assert main(["train", BOWL, "--set", f"run.out_dir={bowl}", "--set", "run.epochs=1", "--set",
                 "run.progress=false"]) == 0
    (bowl_dir,) = (bowl / BOWL).iterdir()
    assert set(json.loads((bowl_dir / "config.json").read_text())) == {
        "problem", "estimator", "optimizer", "schedule", "run", "parallel", "oracle"}


def old_style(config: dict) -> dict:
    """config.json as written before the sections were split: every section and every field."""
    old = json.loads(json.dumps(config))
    old["estimator"] = {"kind": old["estimator"]["kind"], "mu": 0.005, "scheme": "forward", "q": 192,
                        "distribution": "gaussian", **old["estimator"],
                        "interp": {"m": None, "directions": "orthonormal", "lam": 0.02, "max_iters": 1000,
                                   "tol": 1e-6, "warm_start": True, "debias": True}}
    old["optimizer"] = {"momentum": 0.9, "nesterov": False, "betas": [0.9, 0.999], **old["optimizer"]}
    old["schedule"] = {"warmup_epochs": 0.0, "min_lr_ratio": 0.0, "step_every_epochs": 10, "gamma": 0.1,
                       **old["schedule"]}
    old.setdefault("data", {"batch_size": 64, "seed": 0})
    old.setdefault("sparsity", {"enabled": False, "method": "zo-grasp", "sparsity": 0.9, "ranking": "largest",
                                "q": 192, "mu": 0.005, "samples_per_class": 25, "resample_every_epochs": 5,
                                "weights_only": True, "freeze_unselected": False})
    return old


@pytest.mark.parametrize("name,sets", [
    ("digits", ["model.width=2", "estimator=rge", "estimator.q=4", "optimizer=adam", "data.batch_size=64"]),
    (BOWL, ["oracle.steps_per_epoch=3"]),
])
def test_an_old_run_directory_still_evaluates_and_resumes(tmp_path, capsys, name, sets):
    argv = ["train", name, "--set", f"run.out_dir={tmp_path}", "--set", "run.max_steps=2", "--set", "run.progress=false"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / name).iterdir()
    current = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(old_style(current), indent=2))
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["train", name, "--resume", str(run_dir), "--set", "run.max_steps=3"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    # the resume wrote the run's config again: by what it used
    assert json.loads((run_dir / "config.json").read_text())["estimator"] == current["estimator"]
    # a changed setting is still refused
    assert main(["train", name, "--resume", str(run_dir), "--set", "run.seed=7"]) == 2
    assert "run.seed" in capsys.readouterr().err


# ------------------------------------------------------------------ help and the config command


def all_models(problem) -> list[tuple[str, type[BaseModel]]]:
    """(path, model) for every section of `problem` and every variant of its tagged sections."""
    out, todo = [], [(key, section_model(f.annotation)) for key, f in problem.config_model.model_fields.items()]
    seen = set()
    while todo:
        path, model = todo.pop()
        if model is None or (path, model) in seen:
            continue
        seen.add((path, model))
        out.append((path, model))
        if issubclass(model, Tagged):
            todo += [(path, v) for v in model.variants().values()]
        todo += [(f"{path}.{k}", section_model(f.annotation)) for k, f in model.model_fields.items()]
    return out


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_every_setting_has_a_description(name):
    problem = get_problem(name)
    missing = [f"{path}.{k} ({model.__name__})" for path, model in all_models(problem)
               for k, f in model.model_fields.items() if not (f.description or "").strip()]
    assert not missing, missing
    assert all((f.description or "").strip() for f in problem.config_model.model_fields.values())


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_train_problem_help_lists_every_setting(name, capsys):
    problem = get_problem(name)
    assert main(["train", name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--resume" in out and f"settings of {name}" in out
    shown = set(re.findall(r"^\s+([\w.]+) = ", out, re.M))
    used = set(leaves(problem.resolve_config().model_dump()))
    used = {k for k in used if "." in k and not k.startswith("oracle.options")}
    assert used <= shown, sorted(used - shown)
    # and the settings of the other estimator kinds, each under its kind
    assert "with estimator.kind = \"rge\"" in out or isinstance(problem.resolve_config().estimator, RGEConfig)
    for key, f in RGEConfig.model_fields.items():
        described = key == "kind" or " ".join(f.description.split()[:3]) in out  # the tag: its section's text
        assert f"estimator.{key} = " in out and described, key


def test_train_help_without_a_problem_and_with_an_unknown_one(capsys):
    assert main(["train", "--help"]) == 0
    assert "train PROBLEM --help lists the settings" in capsys.readouterr().out
    assert main(["train", "no-such-problem", "--help"]) == 2
    assert "unknown problem or oracle 'no-such-problem'" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "required: problem" in capsys.readouterr().err


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_config_command_writes_toml_that_reads_back_the_same(name, tmp_path, capsys):
    problem = get_problem(name)
    for sets in ([], ["estimator=rge", "estimator.q=7", "optimizer=adam", "run.max_steps=5", "schedule=step"]):
        argv = ["config", name]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0
        text = capsys.readouterr().out
        path = tmp_path / "c.toml"
        path.write_text(text)
        tomllib.loads(text)  # valid TOML
        expected = problem.resolve_config(None, sets).model_dump()
        assert problem.resolve_config(path).model_dump() == expected
        # through the command line: train --config FILE resolves to the same settings
        assert main(["config", name, "--config", str(path)]) == 0
        assert capsys.readouterr().out == text


def test_config_toml_writes_unset_settings_as_none_and_reads_them_back(tmp_path):
    p = get_problem("wake-flow")
    config = p.resolve_config(overrides=["wake.batches_per_epoch=none", "run.max_steps=none"])
    assert config.wake.batches_per_epoch is None  # the default is 10: "none" must survive the round trip
    text = config_toml(config, p)
    assert 'batches_per_epoch = "none"' in text
    (tmp_path / "w.toml").write_text(text)
    assert p.resolve_config(tmp_path / "w.toml").model_dump() == config.model_dump()


def test_the_word_none_is_unset_only_where_a_setting_may_be_unset():
    """`--set estimator.shaping=none` names ES's shaping "none" (a choice, not unset); `phase2=none`
    and `run.max_steps=none` unset settings that may be unset."""
    p = get_problem("digits")
    config = p.resolve_config(overrides=["estimator=es", "estimator.shaping=none", "run.max_steps=none"])
    assert config.estimator.shaping == "none" and config.run.max_steps is None
    assert p.resolve_config(overrides=["estimator=cge", "phase2=null"]).phase2 is None
    with pytest.raises(ConfigError, match="estimator.kind"):
        p.resolve_config(overrides=["estimator=none"])  # a kind must be named


def test_a_plug_in_estimator_without_a_settings_model_takes_mu_and_scheme(monkeypatch):
    from blackbox_zo.estimators import CGE

    class Plain(CGE):
        config_model = EstimatorConfig  # what a plug-in without its own model has (the PlanEstimator default)

    monkeypatch.setattr(ESTIMATORS, "_entries", dict(ESTIMATORS._entries))
    ESTIMATORS.register("plain-cge")(Plain)
    cfg = resolve_config(TrainConfig, {}, overrides=["estimator=plain-cge", "estimator.mu=1e-3"])
    assert type(cfg.estimator) is EstimatorConfig and cfg.model_dump()["estimator"] == {
        "kind": "plain-cge", "mu": 1e-3, "scheme": "forward"}
    with pytest.raises(ConfigError, match="estimator.q: estimator.kind='plain-cge' has no q"):
        resolve_config(TrainConfig, {}, overrides=["estimator=plain-cge", "estimator.q=3"])
    assert EstimatorSettings.variant("plain-cge") is EstimatorConfig


def test_a_section_model_validates_to_the_variant_its_tag_names():
    assert type(SparsitySection.model_validate({"enabled": True})) is SparsityConfig
    assert type(EstimatorConfig.model_validate({"kind": "rge", "q": 3})) is RGEConfig
    with pytest.raises(Exception, match="q\n  Extra inputs are not permitted"):
        CGEConfig.model_validate({"kind": "cge", "q": 3})
