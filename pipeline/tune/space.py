"""The search space: ``tune.space`` of a config, checked before any work and turned into Ray Tune's.

A recipe names config keys and a distribution for each::

    tune:
      space:
        train.learning_rate: {loguniform: [0.05, 0.8]}
        train.warmup_epochs: {uniform: [0.0, 2.0]}
        train.global_batch_size: {choice: [128, 256, 512]}
        model.name: {grid: [resnet18, resnet34]}

Every bound and every listed value goes through the same coercion and range checks as a recipe
value (``config.check_value``), and each is also set into the base config and validated as a
whole (so ``train.warmup_epochs`` above ``train.epochs`` or a batch the workers cannot divide is
caught here, naming the key, not in a trial an hour later).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, ConfigError, check_value, field_base_type, from_dict, to_dict, validate
from pipeline.suggest import did_you_mean

DISTRIBUTIONS = ("loguniform", "uniform", "integer", "choice", "grid")
RANGES = ("loguniform", "uniform", "integer")
# A trial reads the shards preprocessed once for the search, and writes where the search says:
# only the model, its training and its scaling may differ between trials.
SEARCHABLE_SECTIONS = ("train", "model", "scaling")
# Keys a search must not vary: the budget ASHA and PBT measure time in.
FIXED_KEYS = {"train.epochs": "it is every trial's budget (ASHA's max_t); set train.epochs instead"}
# PBT changes values mid-run on a restored checkpoint: only settings that leave the weights' and
# the optimizer's shapes alone may change. Other keys in the space are sampled once per trial.
PBT_MUTABLE_SECTIONS = ("train",)
PBT_FIXED_KEYS = ("train.global_batch_size", "train.per_worker_batch_size", "train.precision", "train.seed")


@dataclass(frozen=True)
class Dimension:
    key: str            # "train.learning_rate"
    distribution: str   # one of DISTRIBUTIONS
    values: tuple       # (low, high) for ranges, the candidates otherwise

    @property
    def is_range(self) -> bool:
        return self.distribution in RANGES

    @property
    def log_scale(self) -> bool:
        return self.distribution == "loguniform"

    def to_tune(self):
        """The Ray Tune domain; ``integer`` includes its upper bound (``tune.randint`` excludes it)."""
        from ray import tune

        if self.distribution == "loguniform":
            return tune.loguniform(*self.values)
        if self.distribution == "uniform":
            return tune.uniform(*self.values)
        if self.distribution == "integer":
            return tune.randint(self.values[0], self.values[1] + 1)
        if self.distribution == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def describe(self) -> str:
        if self.is_range:
            return f"{self.distribution} [{self.values[0]:g}, {self.values[1]:g}]"
        return f"{self.distribution} {list(self.values)}"


def parse_space(config: Config) -> list[Dimension]:
    """``config.tune.space`` as checked dimensions; ConfigError naming ``tune.space.<key>`` otherwise."""
    space = config.tune.space
    if not space:
        raise ConfigError("tune.space is empty: name at least one key to search, e.g. "
                          "tune.space: {train.learning_rate: {loguniform: [0.01, 1.0]}}")
    dimensions = []
    for key, spec in space.items():
        try:
            dimensions.append(_parse_dimension(str(key), spec))
        except ConfigError as error:
            where = f"tune.space.{key}"
            raise ConfigError(str(error) if str(error).startswith(where) else f"{where}: {error}") from None
    for dimension in dimensions:
        _check_in_context(config, dimension)
    tune = config.tune
    if tune.search_alg == "optuna" and any(d.distribution == "grid" for d in dimensions):
        grid = next(d.key for d in dimensions if d.distribution == "grid")
        raise ConfigError(f"tune.space.{grid}: grid needs tune.search_alg=random (optuna samples; use choice)")
    if tune.scheduler == "pbt" and not pbt_mutations(dimensions):
        raise ConfigError("tune.scheduler=pbt perturbs train.* values mid-run (learning rate, weight decay, ...), "
                          "but tune.space has none of them; add one, or use asha or fifo")
    return dimensions


def _parse_dimension(key: str, spec) -> Dimension:
    where = f"tune.space.{key}"
    section = key.split(".", 1)[0]
    if "." not in key:
        raise ConfigError(f"{where}: a search key is section.key, e.g. train.learning_rate")
    if section not in SEARCHABLE_SECTIONS:
        raise ConfigError(f"{where}: only {', '.join(s + '.*' for s in SEARCHABLE_SECTIONS)} keys can be searched "
                          f"(every trial reads the same preprocessed data and writes where the search says)")
    field_base_type(key)  # unknown key -> "unknown config key 'train.learnig_rate'; did you mean ..."
    if key in FIXED_KEYS:
        raise ConfigError(f"{where}: cannot be searched: {FIXED_KEYS[key]}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where} must be one distribution, e.g. {{loguniform: [0.01, 1.0]}} or "
                          f"{{choice: [a, b]}} (one of {', '.join(DISTRIBUTIONS)}), got {spec!r}")
    distribution, values = next(iter(spec.items()))
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{distribution}'{did_you_mean(str(distribution), list(DISTRIBUTIONS))} "
                          f"(one of {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {distribution} needs a list, e.g. {distribution}: "
                          f"{'[low, high]' if distribution in RANGES else '[a, b]'}; got {values!r}")
    if distribution in RANGES:
        return Dimension(key, distribution, _parse_range(where, key, distribution, values))
    checked = [check_value(key, value) for value in values]
    if len({repr(value) for value in checked}) != len(checked):
        raise ConfigError(f"{where}: {distribution} lists a value twice: {values!r}")
    return Dimension(key, distribution, tuple(checked))


def _parse_range(where: str, key: str, distribution: str, values: list) -> tuple:
    kind = field_base_type(key)
    if distribution == "integer" and kind is not int:
        raise ConfigError(f"{where}: integer needs an integer key; {key} is {kind.__name__} "
                          f"(use uniform or loguniform)")
    if distribution != "integer" and kind is not float:
        hint = "use integer or choice" if kind is int else "use choice"
        raise ConfigError(f"{where}: {distribution} needs a number key; {key} is {kind.__name__} ({hint})")
    if len(values) != 2:
        raise ConfigError(f"{where}: {distribution} needs [low, high], got {values!r}")
    low, high = (check_value(key, value) for value in values)
    if not low < high:
        raise ConfigError(f"{where}: {distribution} needs low < high, got [{low}, {high}]")
    if distribution == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low} (use uniform to include 0)")
    return low, high


def _check_in_context(config: Config, dimension: Dimension) -> None:
    """Each bound or candidate set into the base config must give a valid config as a whole."""
    base = to_dict(config)
    for value in dimension.values:
        try:
            validate(apply_params(base, {dimension.key: value}))
        except ConfigError as error:
            raise ConfigError(f"tune.space.{dimension.key}={value!r} would make an invalid trial: {error}") from None


def apply_params(base: dict, params: dict[str, Any]) -> Config:
    """A trial's config: the search's config with the sampled values set and no search settings
    (a trial is a plain training run). Not validated here: see ``trial_config``."""
    raw = copy.deepcopy(base)
    raw.pop("tune", None)
    for key, value in params.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return from_dict(raw)


def trial_config(base: dict, params: dict[str, Any]) -> Config:
    config = apply_params(base, {key: check_value(key, value) for key, value in params.items()})
    validate(config)
    return config


def param_space(dimensions: list[Dimension]) -> dict:
    return {dimension.key: dimension.to_tune() for dimension in dimensions}


def pbt_mutations(dimensions: list[Dimension]) -> dict:
    """PBT's ``hyperparam_mutations``: the dimensions a restored trial may change mid-run."""
    return {d.key: d.to_tune() if d.distribution != "grid" else list(d.values) for d in dimensions
            if d.key.split(".", 1)[0] in PBT_MUTABLE_SECTIONS and d.key not in PBT_FIXED_KEYS}
