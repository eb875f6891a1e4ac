"""The ResNet family: every variant runs, the seed network matches the original's counts exactly."""

import numpy as np
import pytest

import pipeline  # noqa: F401  (must precede TensorFlow: selects tf-keras)
import tf_keras as keras

from pipeline.config import ModelConfig
from pipeline.models import VARIANTS, build_model, minimum_image_size, parameter_counts

# CIFAR-10 train-split statistics in 0-255 units (any plausible values do for these tests).
CIFAR10_MEAN = [125.3, 123.0, 113.9]
CIFAR10_STD = [63.0, 62.1, 66.7]


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Every test starts and ends with the float32 policy and an empty Keras graph."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def random_pixels(count: int, image_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, image_size, image_size, 3)).astype("float32")


# Each variant is built twice rather than four times (stem x policy) to keep the suite fast on
# 2 CPUs: the stem does not interact with the precision policy, so pairing them covers both.
@pytest.mark.parametrize("stem, policy", [("cifar", "float32"), ("imagenet", "mixed_bfloat16")])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_predicts_float32_probabilities(name, stem, policy):
    config = ModelConfig(name=name, stem=stem, width=8, use_bias=False, normalization="standardize")
    image_size = 32
    assert image_size >= minimum_image_size(config, image_size)
    keras.mixed_precision.set_global_policy(policy)

    model = build_model(config, num_classes=10, image_size=image_size, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    probabilities = model(random_pixels(2, image_size), training=False)

    assert probabilities.shape == (2, 10)
    assert probabilities.dtype == "float32"
    probabilities = probabilities.numpy()
    assert not np.isnan(probabilities).any()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    if policy != "float32":
        # The policy really applied: the convolutions compute in bfloat16.
        assert model.get_layer("stem_conv").compute_dtype == "bfloat16"


def test_seed_resnet18_matches_the_original_parameter_counts():
    seed = ModelConfig(name="resnet18", stem="cifar", width=64, use_bias=True, normalization="scale")
    counts = parameter_counts(build_model(seed, num_classes=10, image_size=32))
    assert counts == {
        "total": 11_184_778,
        "trainable": 11_176_970,
        "non_trainable": 7_808,
        "stem_conv": 1_792,
        "stem_bn": 256,
        "stage1": 148_736,
        "stage2": 526_976,
        "stage3": 2_102_528,
        "stage4": 8_399_360,
        "classifier": 5_130,
    }

    # Standardisation keeps its statistics in the layer config, not in weights: same counts.
    standardized = ModelConfig(name="resnet18", stem="cifar", width=64, use_bias=True, normalization="standardize")
    model = build_model(standardized, num_classes=10, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert parameter_counts(model) == counts


def test_standard_resnet50_has_the_canonical_parameter_count():
    config = ModelConfig(name="resnet50", stem="imagenet", width=64, use_bias=False, normalization="scale")
    counts = parameter_counts(build_model(config, num_classes=1000, image_size=224))
    # 25,557,032 is the canonical count (torchvision, timm, the paper's ~25.6M). They count
    # trainable parameters only; Keras also counts BatchNorm's moving mean and variance (two
    # per channel over 53 BN layers, 26,560 channels), which PyTorch keeps as buffers.
    assert counts["trainable"] == 25_557_032
    assert counts["non_trainable"] == 53_120
    assert counts["total"] == 25_557_032 + 53_120


def test_saved_model_reloads_without_custom_objects_and_predicts_identically(tmp_path):
    config = ModelConfig(name="resnet18", stem="cifar", width=8, use_bias=False, normalization="standardize")
    model = build_model(config, num_classes=10, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    pixels = random_pixels(4, 32)
    path = str(tmp_path / "model.keras")
    model.save(path)

    reloaded = keras.models.load_model(path)

    np.testing.assert_array_equal(reloaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0))
    standardize = reloaded.get_layer("standardize").get_config()
    np.testing.assert_allclose(np.ravel(standardize["mean"]), CIFAR10_MEAN)
    np.testing.assert_allclose(np.ravel(standardize["variance"]), np.square(CIFAR10_STD))


def test_standardize_subtracts_mean_and_divides_by_std():
    config = ModelConfig(name="resnet18", stem="cifar", width=8, normalization="standardize")
    model = build_model(config, num_classes=10, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    pixels = random_pixels(1, 32)
    normalized = model.get_layer("standardize")(pixels).numpy()
    expected = (pixels - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-5)


def test_unknown_variant_names_the_closest_valid_one():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*did you mean 'resnet18'") as error:
        build_model(ModelConfig(name="resnet19", normalization="scale"), num_classes=10, image_size=32)
    for valid in VARIANTS:
        assert valid in str(error.value)


def test_standardize_without_statistics_is_refused():
    with pytest.raises(ValueError, match="needs the per-channel mean and std"):
        build_model(ModelConfig(name="resnet18", normalization="standardize"), num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="one value per RGB channel"):
        build_model(ModelConfig(name="resnet18", normalization="standardize"), num_classes=10, image_size=32,
                    mean=[0.5, 0.5], std=[1.0, 1.0])


@pytest.mark.parametrize("stem, image_size", [("cifar", 4), ("imagenet", 16)])
def test_image_too_small_for_the_network_is_refused(stem, image_size):
    config = ModelConfig(name="resnet18", stem=stem, width=8, normalization="scale")
    with pytest.raises(ValueError, match="image_size=.* is too small"):
        build_model(config, num_classes=10, image_size=image_size)


def test_a_checkpoint_whose_upload_stopped_part_way_is_told_from_a_whole_one(tmp_path):
    # Ray Train copies a checkpoint's files in no set order: a failed upload can leave metadata.json
    # and state.json beside a short data file. The sizes in state.json tell the two apart.
    import pyarrow.fs as pafs

    from pipeline.models.saving import checkpoint_problem, load_model, model_metadata, write_checkpoint

    config = ModelConfig(name="resnet18", width=4)
    model = build_model(config, num_classes=3, image_size=16, mean=[0.0] * 3, std=[1.0] * 3)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    metadata = model_metadata(kind="checkpoint", class_names=["a", "b", "c"], image_size=16,
                              config={"model": vars(config)}, mean=[0.0] * 3, std=[1.0] * 3)
    write_checkpoint(str(folder), model=model, optimizer=keras.optimizers.SGD(), state={"epoch": 1, "history": []},
                     metadata=metadata)
    assert checkpoint_problem(pafs.LocalFileSystem(), str(folder)) is None
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    loaded, _ = load_model(str(folder))
    np.testing.assert_allclose(loaded.predict_on_batch(images), model.predict_on_batch(images), atol=1e-6)

    data = next((folder / "tf_checkpoint").glob("ckpt.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    problem = checkpoint_problem(pafs.LocalFileSystem(), str(folder))
    assert problem and problem.startswith(f"tf_checkpoint/{data.name} has 100 of its")
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint_000001 is incomplete \(tf_checkpoint/"):
        load_model(str(folder))
    (folder / "state.json").unlink()
    assert checkpoint_problem(pafs.LocalFileSystem(), str(folder)) == "state.json is missing or unreadable"


def test_a_checkpoint_with_a_moving_average_resumes_both_and_serves_the_average(tmp_path):
    # train.ema_momentum: the checkpoint keeps the trained weights (to resume training) and the
    # average (what the run evaluates and exports); inference from the checkpoint uses the average.
    import pyarrow.fs as pafs

    from pipeline.models.saving import (checkpoint_problem, load_model, model_metadata, restore_checkpoint,
                                        write_checkpoint)

    config = ModelConfig(name="resnet18", width=4)
    model = build_model(config, num_classes=3, image_size=16, mean=[120.0] * 3, std=[60.0] * 3)
    average = [0.5 * value + 0.01 for value in model.get_weights()]
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    metadata = model_metadata(kind="checkpoint", class_names=["a", "b", "c"], image_size=16,
                              config={"model": vars(config)}, mean=[120.0] * 3, std=[60.0] * 3)
    write_checkpoint(str(folder), model=model, optimizer=keras.optimizers.SGD(), state={"epoch": 1, "history": []},
                     metadata=metadata, average=average)
    assert checkpoint_problem(pafs.LocalFileSystem(), str(folder)) is None

    resumed = build_model(config, num_classes=3, image_size=16, mean=[120.0] * 3, std=[60.0] * 3)
    state = restore_checkpoint(str(folder), model=resumed, optimizer=keras.optimizers.SGD())
    for mine, theirs in zip(resumed.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)  # training goes on from its own weights
    for mine, theirs in zip(state["average"], average):
        np.testing.assert_array_equal(mine, theirs)

    images = random_pixels(2, 16, seed=3)
    served = build_model(config, num_classes=3, image_size=16, mean=[120.0] * 3, std=[60.0] * 3)
    served.set_weights(average)
    loaded, _ = load_model(str(folder))
    np.testing.assert_allclose(loaded.predict_on_batch(images), served.predict_on_batch(images), atol=1e-6)
    assert not np.allclose(loaded.predict_on_batch(images), model.predict_on_batch(images), atol=1e-6)

    (folder / "average.npz").write_bytes((folder / "average.npz").read_bytes()[:50])
    assert checkpoint_problem(pafs.LocalFileSystem(), str(folder)).startswith("average.npz has 50 of its")


def test_the_inference_function_is_the_models_forward_pass_for_any_batch_size():
    # What the model actors and the test evaluation call instead of predict_on_batch: the same
    # probabilities, for a full and a short last batch, from one trace (a retrace per batch size
    # would compile the model again for every short last batch of a dataset).
    from pipeline.models.saving import predict_function

    model = build_model(ModelConfig(name="resnet18", width=4), num_classes=3, image_size=16,
                        mean=[120.0] * 3, std=[60.0] * 3)
    predict = predict_function(model)
    for count in (5, 2):
        images = random_pixels(count, 16, seed=count)
        np.testing.assert_allclose(predict(images).numpy(), model.predict_on_batch(images), atol=1e-6)
    assert predict.experimental_get_tracing_count() == 1


def test_an_export_loads_as_keras_load_model_loads_it(tmp_path):
    # load_model reads an export's weights from an extracted file rather than from inside the
    # .keras zip (3x faster for every model actor): same layers, same weights, same outputs as
    # tf-keras' own loader, the BatchNorm moving statistics included.
    from pipeline.models.saving import load_model, model_metadata, save_export

    config = ModelConfig(name="resnet18", width=4)
    model = build_model(config, num_classes=3, image_size=16, mean=[120.0] * 3, std=[60.0] * 3)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(0.5, 1.5, weight.shape).astype(np.float32) for weight in model.get_weights()])
    metadata = model_metadata(kind="export", class_names=["a", "b", "c"], image_size=16,
                              config={"model": vars(config)}, mean=[120.0] * 3, std=[60.0] * 3)
    folder = save_export(model, metadata, str(tmp_path / "export"))

    loaded, loaded_metadata = load_model(folder)
    reference = keras.models.load_model(str(tmp_path / "export" / "model.keras"), compile=False)

    assert loaded_metadata["class_names"] == ["a", "b", "c"]
    assert loaded.get_config() == reference.get_config()
    assert [weight.name for weight in loaded.weights] == [weight.name for weight in reference.weights]
    for ours, theirs, original in zip(loaded.get_weights(), reference.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours, original)
    images = random_pixels(3, 16)
    np.testing.assert_array_equal(loaded.predict_on_batch(images), reference.predict_on_batch(images))
    assert loaded.optimizer is None  # compile=False, as for tf-keras' loader


def test_the_test_time_flip_is_used_wherever_the_export_is(tmp_path):
    # model.test_time_flip: the mean of each image's and its mirror image's probabilities, in the
    # forward pass of batch inference, serving and one-image predict (inference_function) and in
    # the export's SavedModel signature; an export without the key is used as it is.
    import tensorflow as tf
    from PIL import Image

    from pipeline.infer import predict_image
    from pipeline.models.saving import inference_function, load_model, model_metadata, save_export

    config = ModelConfig(name="resnet18", width=4, test_time_flip=True)
    model = build_model(config, num_classes=3, image_size=16, mean=[120.0] * 3, std=[60.0] * 3)
    images = np.floor(random_pixels(4, 16, seed=1))  # whole 0-255 values: a PNG holds them exactly
    plain = model.predict_on_batch(images)
    mirrored = model.predict_on_batch(images[:, :, ::-1].copy())
    assert np.abs(plain - mirrored).max() > 1e-3  # the mirror image really is another input
    for flip in (True, False):
        settings = {**vars(config), "test_time_flip": flip}
        metadata = model_metadata(kind="export", class_names=["a", "b", "c"], image_size=16,
                                  config={"model": settings}, mean=[120.0] * 3, std=[60.0] * 3)
        folder = save_export(model, metadata, str(tmp_path / f"export-{flip}"))
        expected = (plain + mirrored) / 2 if flip else plain
        loaded, loaded_metadata = load_model(folder)
        np.testing.assert_allclose(inference_function(loaded, loaded_metadata)(images).numpy(), expected, atol=1e-6)
        signature = tf.saved_model.load(str(tmp_path / f"export-{flip}" / "saved_model")).signatures["serving_default"]
        np.testing.assert_allclose(signature(images=tf.constant(images))["probabilities"].numpy(), expected,
                                   atol=1e-5)
        Image.fromarray(images[0].astype(np.uint8)).save(tmp_path / "one.png")
        one = predict_image(folder, str(tmp_path / "one.png"), top_k=3)
        assert one["confidence"] == pytest.approx(float(expected[0].max()), abs=1e-5)
    del metadata["model"]["test_time_flip"]  # an export made before the setting existed
    np.testing.assert_allclose(inference_function(loaded, {"model": metadata["model"]})(images).numpy(), plain,
                               atol=1e-6)
