import pytest

from pipeline.config import (Config, ConfigError, batch_sizes, fingerprint, load_config, scaled_learning_rate,
                             to_dict, from_dict)

RECIPES = ["configs/seed.yaml", "configs/fast.yaml", "configs/smoke.yaml", "configs/folder224.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_load_and_round_trip(recipe):
    config = load_config(recipe)
    assert from_dict(to_dict(config)) == config


def test_seed_recipe_is_the_original():
    config = load_config("configs/seed.yaml")
    assert (config.model.name, config.model.stem, config.model.width) == ("resnet18", "cifar", 64)
    assert config.model.use_bias and config.model.normalization == "scale"
    train = config.train
    assert (train.epochs, train.global_batch_size, train.learning_rate, train.momentum) == (100, 100, 0.005, 0.9)
    assert (train.lr_schedule, train.weight_decay, train.label_smoothing, train.precision) == ("constant", 0, 0, "fp32")
    assert not (train.random_crop_padding or train.horizontal_flip or train.cutout)
    assert (config.data.val_fraction, config.data.split_method) == (0.1, "tail")
    assert scaled_learning_rate(config) == 0.005


def test_overrides_parse_yaml_values():
    config = load_config("configs/fast.yaml", ["train.epochs=3", "train.step_epochs=[1, 2]", "run.name=x",
                                               "train.seed=null", "train.learning_rate=1"])
    assert (config.train.epochs, config.train.step_epochs, config.run.name) == (3, [1, 2], "x")
    assert config.train.seed is None and config.train.learning_rate == 1.0
    assert config.recipe == "fast"
    assert (config.train.steps_per_execution, config.train.jit_compile) == ("auto", "auto")
    tuned = load_config("configs/fast.yaml", ["train.steps_per_execution=8", "train.jit_compile=true"])
    assert (tuned.train.steps_per_execution, tuned.train.jit_compile) == (8, True)
    # Text keys take the text as written (a Tune trial id is YAML's integer 4052700000), null
    # still clears an optional one, and number keys still read numbers.
    named = load_config(None, ["run.name=40527_00000", "tune.name=2024", "data.output=yes", "model.name=resnet18"])
    assert (named.run.name, named.tune.name, named.data.output) == ("40527_00000", "2024", "yes")
    assert load_config(None, ["run.name=x", "run.name=null"]).run.name is None
    assert load_config(None, ["train.epochs=1_0"]).train.epochs == 10


def test_numbers_as_people_write_them_in_overrides_files_and_search_spaces(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4, 1E-3 and 5. as text: each is still the number it spells.
    config = load_config("configs/fast.yaml", ["train.learning_rate=3e-4", "train.weight_decay=1E-3",
                                               "train.label_smoothing=.5", "train.momentum=0.",
                                               "train.epochs=5.0", "train.global_batch_size=1e3"])
    train = config.train
    assert (train.learning_rate, train.weight_decay, train.label_smoothing, train.momentum) == (3e-4, 1e-3, 0.5, 0.0)
    assert (train.epochs, train.global_batch_size) == (5, 1000)
    assert type(train.epochs) is int and type(train.global_batch_size) is int
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  weight_decay: 5e-4\n  learning_rate: 1e-1\n  epochs: 1e1\n"
                      "tune:\n  space:\n    train.learning_rate: {loguniform: [1e-4, 1e-1]}\n")
    loaded = load_config(str(recipe))
    assert (loaded.train.weight_decay, loaded.train.learning_rate, loaded.train.epochs) == (5e-4, 0.1, 10)
    from pipeline.tune.space import parse_space

    assert parse_space(loaded)[0].values == (1e-4, 1e-1)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=5.5", "'train.epochs' must be an integer, got 5.5"),
    ("train.learning_rate=3e-4x", "'train.learning_rate' must be a number, got '3e-4x'"),
    ("train.learning_rate=nan", "'train.learning_rate' must be a finite number"),
    ("train.weight_decay=inf", "'train.weight_decay' must be a finite number"),
    ("train.epochs=true", "'train.epochs' must be an integer, got True"),
])
def test_what_is_not_a_number_is_still_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/fast.yaml", [override])


@pytest.mark.parametrize("override, message", [
    ("train.epoch=5", "did you mean 'train.epochs'"),
    ("trian.epochs=5", "did you mean 'train'"),
    ("train.epochs=five", "must be an integer"),
    ("train.epochs=0", "must be >= 1"),
    ("train.learning_rate=0", "must be > 0"),
    ("train.horizontal_flip=1", "true or false"),
    ("train.precision=bf61", "did you mean 'bf16'"),
    ("data.val_fraction=0.95", "<= 0.9"),
    ("train.epochs", "section.key=value"),
    ("scaling.collective=nccl", "needs scaling.use_gpu"),
    ("train.steps_per_execution=often", "must be an integer or auto, got 'often'"),
    ("train.steps_per_execution=0", "must be >= 1"),
    ("train.jit_compile=maybe", "must be true or false or auto"),
    ("scaling.gpus_per_worker=0", "must be > 0"),
    ("infer.gpus_per_actor=2", "must be <= 1"),  # one model replica per GPU: more actors instead
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/fast.yaml", [override])


def test_unknown_key_in_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(str(recipe))


def test_batch_sizes_and_linear_scaling_rule():
    config = load_config("configs/fast.yaml", ["scaling.num_workers=4"])
    assert batch_sizes(config) == (64, 256)
    assert scaled_learning_rate(config) == pytest.approx(0.2)
    config = load_config("configs/fast.yaml", ["train.global_batch_size=null", "train.per_worker_batch_size=128",
                                               "scaling.num_workers=4"])
    assert batch_sizes(config) == (128, 512)
    assert scaled_learning_rate(config) == pytest.approx(0.4)  # 0.2 per 256 examples, x 512/256
    with pytest.raises(ConfigError, match="not divisible"):
        load_config("configs/fast.yaml", ["scaling.num_workers=3"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config("configs/fast.yaml", ["train.per_worker_batch_size=8"])


def test_fingerprint_is_stable_and_sensitive():
    a = to_dict(Config())
    b = to_dict(Config())
    assert fingerprint(a) == fingerprint(b)
    b["train"]["epochs"] = 7
    assert fingerprint(a) != fingerprint(b)


def test_elastic_worker_counts_keep_the_global_batch():
    config = load_config(None, ["scaling.num_workers=[1, 4]", "train.global_batch_size=24"])
    assert (config.scaling.min_workers, config.scaling.num_workers) == (1, 4)
    # Each count the run may have divides the global batch: the learning rate and the steps of an
    # epoch stay as configured whatever the worker count.
    assert [batch_sizes(config, workers) for workers in (1, 2, 3, 4)] == [(24, 24), (12, 24), (8, 24), (6, 24)]
    for overrides, message in (
            (["scaling.num_workers=[2, 4]", "train.global_batch_size=16"], "not divisible by 3 workers"),
            (["scaling.num_workers=[1, 2]", "train.global_batch_size=null", "train.per_worker_batch_size=8"],
             "keeps the global batch fixed"),
            (["scaling.num_workers=4", "scaling.min_workers=5", "train.global_batch_size=60"], "is above"),
            (["scaling.num_workers=[1, 2, 3]"], "a number of workers or \\[min, max\\]")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_auto_stem_is_the_imagenet_one_for_photos_and_the_size_check_uses_it():
    from pipeline.models.registry import minimum_image_size, resolved_stem

    assert [resolved_stem("auto", size) for size in (32, 95, 96, 224)] == ["cifar", "cifar", "imagenet", "imagenet"]
    assert resolved_stem("cifar", 224) == "cifar"
    model = load_config("configs/smoke.yaml").model
    assert model.stem == "auto" and minimum_image_size(model, 32) == 8 and minimum_image_size(model, 224) == 32
    with pytest.raises(ConfigError, match="too small for resnet18 with the 'imagenet' stem"):
        load_config("configs/folder224.yaml", ["data.image_size=16"])
    load_config("configs/smoke.yaml", ["data.image_size=16"])  # auto: the cifar stem fits 16 px
