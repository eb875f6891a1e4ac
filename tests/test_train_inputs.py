import numpy as np
import pytest

import pipeline  # noqa: F401
import tensorflow as tf

from pipeline.config import TrainConfig
from pipeline.train import inputs


def test_random_crop_is_a_window_of_the_padded_image():
    tf.random.set_seed(1)
    images = np.random.default_rng(0).integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)
    cropped = inputs.random_crop(tf.constant(images), 2).numpy()
    assert cropped.shape == images.shape
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
    for original, out in zip(padded, cropped):
        windows = [original[r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(np.array_equal(out, window) for window in windows)
    assert not all(np.array_equal(a, b) for a, b in zip(images, cropped))  # something moved


def test_cutout_fills_one_square_with_the_mean_colour():
    tf.random.set_seed(2)
    images = np.full((32, 16, 16, 3), 200, np.uint8)
    out = inputs.cutout(tf.constant(images), 4, tf.constant(np.array([10, 20, 30], np.uint8))).numpy()
    changed = (out != images).any(axis=-1)
    assert changed.any(axis=(1, 2)).all()
    assert changed.sum(axis=(1, 2)).max() <= 16  # at most 4 x 4 per image
    assert set(map(tuple, out[changed].reshape(-1, 3))) == {(10, 20, 30)}


def test_augment_flips_and_keeps_labels():
    tf.random.set_seed(3)
    images = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3).repeat(64, axis=0)
    labels = np.eye(64, dtype=np.float32)
    config = TrainConfig(horizontal_flip=True)
    dataset = inputs.augment(tf.data.Dataset.from_tensors((images, labels)), config, [0, 0, 0])
    out_images, out_labels = next(iter(dataset))
    flipped = [np.array_equal(image, images[0, :, ::-1]) for image in out_images.numpy()]
    kept = [np.array_equal(image, images[0]) for image in out_images.numpy()]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    np.testing.assert_array_equal(out_labels.numpy(), labels)


@pytest.mark.parametrize("rows, workers, batch, replicas, drop, expected", [
    (45000, 1, 256, 1, True, (175, 175)), (45000, 2, 128, 1, True, (175, 175)), (5001, 2, 100, 1, False, (25, 25)),
    (10, 3, 4, 1, True, (0, 0)),
    # Two GPUs per worker: global batch 256 over 2 workers is 64 per replica, two batches per step.
    (45000, 2, 64, 2, True, (175, 350)), (5001, 2, 100, 2, False, (13, 25))])
def test_steps_and_batches_match_rays_equal_split(rows, workers, batch, replicas, drop, expected):
    assert inputs.steps_and_batches(rows, workers, batch, replicas, drop) == expected


def test_worker_seeds_follow_train_seed_and_differ_per_worker_and_epoch():
    assert inputs.worker_seed(None, 0) is None and inputs.worker_seed(None, 3, epoch=5) is None  # null: random
    seeds = {inputs.worker_seed(7, rank, epoch) for rank in range(4) for epoch in range(10)}
    assert len(seeds) == 40 and all(0 <= seed < 2**31 for seed in seeds)
    assert inputs.worker_seed(7, 1, 2) == inputs.worker_seed(7, 1, 2) != inputs.worker_seed(8, 1, 2)
