"""The search space: parsing, the checks that run before any work, and what trials receive."""

import os
import subprocess
import sys

import pytest
from ray import tune

from pipeline.config import ConfigError, load_config, to_dict
from pipeline.tune.search import check_search, make_scheduler
from pipeline.tune.space import Dimension, parse_space, pbt_mutations, trial_config

from conftest import REPO


def search_config(*overrides, space=None):
    config = load_config(os.path.join(REPO, "configs/search-smoke.yaml"), list(overrides))
    if space is not None:
        config.tune.space = space
    return config


def test_ready_searches_pass_their_checks():
    for recipe in ("search.yaml", "search-smoke.yaml"):
        dimensions = check_search(load_config(os.path.join(REPO, "configs", recipe)))
        assert dimensions and all(isinstance(d, Dimension) for d in dimensions)


def test_every_distribution_becomes_the_tune_domain():
    dimensions = parse_space(search_config(space={
        "train.learning_rate": {"loguniform": [0.01, 1.0]},
        "train.warmup_epochs": {"uniform": [0, 2]},          # integers are accepted for a float key
        "train.cutout": {"integer": [0, 8]},
        "model.name": {"choice": ["resnet18", "resnet34"]},
        "train.horizontal_flip": {"grid": [True, False]},
    }))
    by_key = {d.key: d for d in dimensions}
    assert by_key["train.warmup_epochs"].values == (0.0, 2.0)
    domains = {d.key: d.to_tune() for d in dimensions}
    assert isinstance(domains["train.learning_rate"], tune.search.sample.Float)
    assert domains["train.learning_rate"].lower == 0.01 and domains["train.learning_rate"].upper == 1.0
    # integer includes its upper bound: tune.randint excludes it, so the domain ends one above.
    assert (domains["train.cutout"].lower, domains["train.cutout"].upper) == (0, 9)
    assert domains["model.name"].categories == ["resnet18", "resnet34"]
    assert domains["train.horizontal_flip"] == {"grid_search": [True, False]}


@pytest.mark.parametrize("space, message", [
    ({}, "tune.space is empty"),
    ({"train.learnig_rate": {"loguniform": [0.01, 1]}}, "tune.space.train.learnig_rate: unknown config key 'train.learnig_rate'; did you mean 'train.learning_rate'?"),
    ({"learning_rate": {"loguniform": [0.01, 1]}}, "tune.space.learning_rate: a search key is section.key"),
    ({"data.val_fraction": {"uniform": [0.1, 0.2]}}, "tune.space.data.val_fraction: only train.*, model.*, scaling.* keys"),
    ({"train.epochs": {"integer": [1, 5]}}, "tune.space.train.epochs: cannot be searched"),
    ({"train.learning_rate": {"lognormal": [0.01, 1]}}, "tune.space.train.learning_rate: unknown distribution 'lognormal'; did you mean 'loguniform'?"),
    ({"train.learning_rate": [0.01, 1]}, "tune.space.train.learning_rate must be one distribution"),
    ({"train.learning_rate": {"loguniform": [1.0, 0.01]}}, "tune.space.train.learning_rate: loguniform needs low < high"),
    ({"train.learning_rate": {"loguniform": [0.01]}}, "tune.space.train.learning_rate: loguniform needs [low, high]"),
    ({"train.weight_decay": {"loguniform": [0, 0.1]}}, "tune.space.train.weight_decay: loguniform needs low > 0"),
    ({"train.learning_rate": {"uniform": [0, 1]}}, "tune.space.train.learning_rate: config key 'train.learning_rate' must be > 0.0, got 0.0"),
    ({"train.momentum": {"choice": [0.9, 1.5]}}, "tune.space.train.momentum: config key 'train.momentum' must be <= 0.999"),
    ({"train.cutout": {"uniform": [0, 4]}}, "tune.space.train.cutout: uniform needs a number key; train.cutout is int (use integer or choice)"),
    ({"train.learning_rate": {"integer": [1, 4]}}, "tune.space.train.learning_rate: integer needs an integer key"),
    ({"model.name": {"uniform": [0, 1]}}, "tune.space.model.name: uniform needs a number key; model.name is str (use choice)"),
    ({"train.lr_schedule": {"choice": ["cosine", "cosin"]}}, "tune.space.train.lr_schedule: config key 'train.lr_schedule' must be one of"),
    ({"train.horizontal_flip": {"choice": [True, "yes"]}}, "config key 'train.horizontal_flip' must be true or false, got 'yes'"),
    ({"train.label_smoothing": {"grid": [0.1, 0.1]}}, "tune.space.train.label_smoothing: grid lists a value twice"),
    ({"train.label_smoothing": {"grid": []}}, "tune.space.train.label_smoothing: grid needs a list"),
    # Valid alone, invalid with the rest of the config (search-smoke trains 3 epochs, batch 16):
    ({"train.warmup_epochs": {"uniform": [0.0, 5.0]}}, "tune.space.train.warmup_epochs=5.0 would make an invalid trial: train.warmup_epochs=5.0 must be below train.epochs=3"),
    ({"scaling.num_workers": {"choice": [1, 3]}}, "tune.space.scaling.num_workers=3 would make an invalid trial: train.global_batch_size=16 is not divisible by scaling.num_workers=3"),
])
def test_bad_spaces_name_the_key(space, message):
    with pytest.raises(ConfigError) as error:
        parse_space(search_config(space=space))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["tune.search_alg=optuna", "tune.space.train.label_smoothing={grid: [0.0, 0.1]}"],
     "tune.space.train.label_smoothing: grid needs tune.search_alg=random"),
    (["tune.scheduler=pbt", "tune.space={model.name: {choice: [resnet18, resnet34]}}"],
     "tune.scheduler=pbt perturbs train.* values mid-run"),
    (["tune.grace_period=3"], "tune.grace_period=3 must be below train.epochs=3"),
    (["tune.scheduler=pbt", "tune.perturbation_interval=5"], "tune.perturbation_interval=5 must be below"),
    (["tune.metric=val_accuracy", "data.val_fraction=0"], "tune.metric=val_accuracy needs a validation split"),
    (["tune.metric=f1"], "config key 'tune.metric' must be one of"),
    (["tune.reduction_factor=1"], "config key 'tune.reduction_factor' must be > 1.0"),
])
def test_bad_search_settings_fail_before_work(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_search(search_config(*overrides))
    assert message in str(error.value)


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs/tune.py"), "--config", os.path.join(REPO, "configs/search-smoke.yaml"),
         "--set", "tune.space.train.learning_rate={loguniform: [0, 1]}", "--set", f"tune.storage_path={tmp_path}/s"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: tune.space.train.learning_rate: config key 'train.learning_rate' must be > 0.0, got 0.0"]
    assert not os.path.exists(tmp_path / "s")  # nothing started, nothing written


def test_set_one_entry_of_the_space_from_the_command_line():
    config = search_config("tune.space.train.momentum={choice: [0.8, 0.9]}")
    assert config.tune.space["train.momentum"] == {"choice": [0.8, 0.9]}
    assert "train.learning_rate" in config.tune.space  # the recipe's entries are kept


def test_trial_config_sets_values_and_drops_the_search():
    base = search_config()
    config = trial_config(to_dict(base), {"train.learning_rate": 0.05, "model.name": "resnet34"})
    assert config.train.learning_rate == 0.05 and config.model.name == "resnet34"
    assert config.tune.space == {} and config.tune.num_samples == 4  # a trial is a plain training run
    assert config.train.epochs == base.train.epochs and config.recipe == base.recipe
    with pytest.raises(ConfigError, match="train.momentum"):
        trial_config(to_dict(base), {"train.momentum": 2.0})


def test_pbt_mutates_only_what_can_change_mid_run():
    dimensions = parse_space(search_config(space={
        "train.learning_rate": {"loguniform": [0.01, 1.0]},
        "train.label_smoothing": {"grid": [0.0, 0.1]},
        "train.global_batch_size": {"choice": [16, 32]},
        "model.width": {"choice": [8, 16]},
    }))
    mutations = pbt_mutations(dimensions)
    assert set(mutations) == {"train.learning_rate", "train.label_smoothing"}
    assert mutations["train.label_smoothing"] == [0.0, 0.1]
    scheduler = make_scheduler(search_config("tune.scheduler=pbt"), dimensions)
    assert scheduler._perturbation_interval == 2 and scheduler._time_attr == "epoch" and scheduler.last_epoch == 3

