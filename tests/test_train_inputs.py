import numpy as np
import pyarrow as pa
import pytest

import pipeline  # noqa: F401

from pipeline.config import TrainConfig
from pipeline.train import inputs


def augmentation(**train) -> inputs.Augmentation:
    return inputs.Augmentation(TrainConfig(**{"random_crop_padding": 0, "horizontal_flip": False, "cutout": 0,
                                              **train}), [10.2, 19.8, 30])


def test_random_crop_is_a_window_of_the_padded_image():
    images = np.random.default_rng(0).integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)
    images.flags.writeable = False  # a view of a Ray block: never written to
    cropped, _ = augmentation(random_crop_padding=2)(images, None, np.random.default_rng(1))
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
    offsets = set()
    for original, out in zip(padded, cropped):
        matches = [(r, c) for r in range(5) for c in range(5) if np.array_equal(out, original[r:r + 8, c:c + 8])]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 10  # a random offset per image, not one per batch


def test_flip_mirrors_about_half_of_the_images_and_keeps_labels():
    images = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3).repeat(64, axis=0)
    labels = np.arange(64)
    out, out_labels = augmentation(horizontal_flip=True)(images, labels, np.random.default_rng(3))
    flipped = [np.array_equal(image, images[0, :, ::-1]) for image in out]
    kept = [np.array_equal(image, images[0]) for image in out]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    np.testing.assert_array_equal(out_labels, labels)


def test_cutout_fills_one_square_with_the_mean_colour():
    images = np.full((32, 16, 16, 3), 200, np.uint8)
    images.flags.writeable = False
    out, _ = augmentation(cutout=4)(images, None, np.random.default_rng(2))
    assert (images == 200).all()  # the input is left alone
    changed = (out != images).any(axis=-1)
    assert changed.any(axis=(1, 2)).all()
    assert changed.sum(axis=(1, 2)).max() <= 16  # at most 4 x 4 per image
    assert len({tuple(np.argwhere(square).mean(axis=0)) for square in changed}) > 10  # placed per image
    assert set(map(tuple, out[changed].reshape(-1, 3))) == {(10, 20, 30)}  # the rounded mean


@pytest.mark.parametrize("size, padding, cutout", [(32, 4, 8), (9, 2, 3), (224, 4, 0), (12, 0, 5)])
def test_crop_flip_and_cutout_equal_the_padded_image_cut_one_by_one(size, padding, cutout):
    """The grouped slice copies give each image exactly its own window, mirror and square: the
    same pixels as padding, cutting and filling image by image with the same draws."""
    images = np.random.default_rng(0).integers(1, 256, (40, size, size, 3), dtype=np.uint8)
    images.flags.writeable = False
    out, _ = augmentation(random_crop_padding=padding, horizontal_flip=True, cutout=cutout)(
        images, None, np.random.default_rng(4))
    draws = np.random.default_rng(4)
    top = draws.integers(0, 2 * padding + 1, 40) if padding else np.zeros(40, int)
    left = draws.integers(0, 2 * padding + 1, 40) if padding else np.zeros(40, int)
    mirrored = draws.random(40) < 0.5
    rows, columns = draws.integers(0, size, 40), draws.integers(0, size, 40)
    for i, image in enumerate(np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])):
        expected = image[top[i]:top[i] + size, left[i]:left[i] + size].copy()
        if mirrored[i]:
            expected = expected[:, ::-1].copy()
        if cutout:
            inside = ((np.abs(np.arange(size)[:, None] - rows[i]) * 2 < cutout)
                      & (np.abs(np.arange(size)[None, :] - columns[i]) * 2 < cutout))
            expected[inside] = (10, 20, 30)
        np.testing.assert_array_equal(out[i], expected)


def test_augmentation_is_off_when_the_recipe_asks_for_none_and_seeded_otherwise():
    assert inputs.Augmentation.from_config(TrainConfig(random_crop_padding=0, horizontal_flip=False, cutout=0),
                                           [0, 0, 0]) is None
    augment = augmentation(random_crop_padding=4, horizontal_flip=True, cutout=8)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    first, second, other = (augment(images, None, np.random.default_rng(seed))[0] for seed in (5, 5, 6))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


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


class FakeShard:
    """The part of ray.data.DataIterator that shard_batches uses: whole Arrow blocks of uneven
    sizes, each row's label its index; its first byte of pixels is the index's low byte, the
    others count up from 1 (so a flip shows)."""

    def __init__(self, block_sizes):
        self.block_sizes = block_sizes

    def iter_batches(self, batch_size, batch_format, **_):
        assert batch_size is None and batch_format == "pyarrow"
        start = 0
        for size in self.block_sizes:
            labels = np.arange(start, start + size)
            images = pa.array([bytes([label % 256]) + bytes(range(1, 12)) for label in labels], pa.binary())
            yield pa.table({"id": [str(label) for label in labels], "label": labels, "image": images})
            start += size


@pytest.mark.parametrize("buffer", [0, 5, 64, 1000])
def test_shard_batches_give_every_row_once_in_whole_batches(buffer):
    shard = FakeShard([3, 40, 1, 17, 64, 2])  # 127 rows
    batches = list(inputs.shard_batches(shard, image_size=2, batch_size=16, shuffle_buffer_size=buffer,
                                        shuffle_seed=1))
    assert [len(labels) for _, labels in batches] == [16] * 7  # 112 rows; the last 15 dropped
    labels = np.concatenate([labels for _, labels in batches])
    assert len(set(labels)) == 112 and labels.dtype == np.int32
    for images, batch_labels in batches:  # pixels travel with their labels
        assert images.shape == (len(batch_labels), 2, 2, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[:, 0, 0, 0], batch_labels % 256)
    if buffer == 0:
        np.testing.assert_array_equal(labels, np.arange(112))  # no buffer: stream order
    else:
        assert not np.array_equal(labels, np.sort(labels))
    if buffer >= 127:  # a buffer holding the whole shard is a full shuffle: the dropped 15 are random
        assert sorted(set(range(127)) - set(labels)) != list(range(112, 127))
    kept = list(inputs.shard_batches(shard, image_size=2, batch_size=16, shuffle_buffer_size=buffer,
                                     shuffle_seed=1, drop_remainder=False))
    assert [len(labels) for _, labels in kept] == [16] * 7 + [15]
    assert sorted(np.concatenate([labels for _, labels in kept])) == list(range(127))


def test_shuffle_buffer_is_seeded_and_mixes_far_apart_rows():
    shard = FakeShard([100] * 20)
    def order(seed):
        return np.concatenate([labels for _, labels in inputs.shard_batches(
            shard, image_size=2, batch_size=50, shuffle_buffer_size=500, shuffle_seed=seed)])
    assert np.array_equal(order(3), order(3)) and not np.array_equal(order(3), order(4))
    first = order(3)[:500]
    # A 500-row buffer: the first 500 out mix the first ~1000 rows, not only the first block.
    assert first.max() > 600 and len({label // 100 for label in first}) >= 6


def test_the_shuffle_buffer_holds_at_most_its_bytes_of_pixels():
    # 10,000 rows of 224 px images would be 1.5 GB per worker: the byte limit (1 GiB) wins.
    assert inputs.shuffle_buffer_rows(TrainConfig(), 32) == 10000
    assert inputs.shuffle_buffer_rows(TrainConfig(), 224) == 2**30 // (224 * 224 * 3) == 7133
    assert inputs.shuffle_buffer_rows(TrainConfig(shuffle_buffer_bytes=0), 32) == 0  # no buffer at all
    limit = 40 * 12  # bytes: 40 rows of 2x2x3 pixels
    rows = inputs.shuffle_buffer_rows(TrainConfig(shuffle_buffer_bytes=limit), 2)
    shuffler = inputs.RowShuffler(rows, np.random.default_rng(0))
    for images, labels in inputs.shard_batches(FakeShard([30, 70]), image_size=2, batch_size=10):
        shuffler.add(images, labels)
    assert rows == 40 and shuffler.images.nbytes == limit


def test_rebatcher_cuts_any_chunks_into_exact_batches():
    batcher = inputs.Rebatcher(4)
    out = []
    for size in (1, 2, 9, 0, 3):
        images = np.zeros((size, 1, 1, 3), np.uint8)
        out += list(batcher.add(images, np.arange(size)))
    assert [len(labels) for _, labels in out] == [4, 4, 4] and batcher.count == 3
    images, labels = batcher.rest()
    assert len(labels) == 3 and batcher.rest() is None


def test_the_train_dataset_is_augmented_with_the_epochs_seed():
    shard = FakeShard([50, 50])
    def epoch(seed, augment):
        dataset = inputs.shard_to_dataset(shard, image_size=2, num_classes=256, batch_size=25, steps=4,
                                          shuffle_seed=seed, augmentation=augment)
        return [(images.numpy(), labels.numpy()) for images, labels in dataset]
    plain = epoch(1, None)
    assert [images[:, 0, 0, 0].tolist() for images, _ in plain] == [list(range(i, i + 25)) for i in (0, 25, 50, 75)]
    flip = augmentation(horizontal_flip=True)
    flipped = epoch(1, flip)
    assert len(flipped) == 4
    mirrored = 0
    for (images, labels), (original, _) in zip(flipped, plain):
        np.testing.assert_array_equal(labels.argmax(axis=1), original[:, 0, 0, 0])  # labels untouched
        for image, source in zip(images, original):
            assert np.array_equal(image, source) or np.array_equal(image, source[:, ::-1])
            mirrored += not np.array_equal(image, source)
    assert 20 < mirrored < 80
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(flipped, epoch(1, flip)))  # seeded
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(flipped, epoch(2, flip)))


def test_resized_crop_boxes_cover_the_asked_share_of_the_image_at_a_bounded_aspect():
    boxes = inputs.resized_crop_boxes(2000, 0.25, np.random.default_rng(0))
    assert boxes.dtype == np.float32 and boxes.shape == (2000, 4)
    top, left, bottom, right = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (bottom <= 1 + 1e-6).all() and (right <= 1 + 1e-6).all()
    height, width = bottom - top, right - left
    area, ratio = height * width, width / height
    assert area.min() >= 0.25 * 0.75 - 1e-6 and area.max() <= 1 + 1e-6  # clipped sides only shrink the area
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert area.min() < 0.3 and area.max() > 0.95 and np.median(area) > 0.5  # the whole range is drawn
    assert left.max() > 0.5 and top.max() > 0.5  # anywhere in the picture
    np.testing.assert_array_equal(boxes, inputs.resized_crop_boxes(2000, 0.25, np.random.default_rng(0)))


def test_resize_crops_gives_the_box_back_at_full_size():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    whole = inputs.resize_crops(images, np.array([[0, 0, 1, 1]] * 2, np.float32), 16).numpy()
    assert whole.dtype == np.uint8
    np.testing.assert_array_equal(whole, images)  # the whole image is the image
    # The top-left quarter (pixels 0-7 of 16, box edges at pixel centres 0 and 7): each source
    # pixel at every other output pixel.
    quarter = inputs.resize_crops(images, np.array([[0, 0, 7 / 15, 7 / 15]] * 2, np.float32), 15).numpy()
    np.testing.assert_array_equal(quarter[:, ::2, ::2], images[:, :8, :8])


def test_the_train_dataset_is_random_resized_crops_of_its_images():
    shard = FakeShard([50, 50])
    augment = augmentation(random_resized_crop=0.25)
    dataset = inputs.shard_to_dataset(shard, image_size=2, num_classes=256, batch_size=25, steps=4,
                                      shuffle_seed=1, augmentation=augment)
    batches = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    plain = [(images.numpy(), labels.numpy()) for images, labels in inputs.shard_to_dataset(
        shard, image_size=2, num_classes=256, batch_size=25, steps=4, shuffle_seed=1)]
    assert [images.shape for images, _ in batches] == [(25, 2, 2, 3)] * 4
    assert all(images.dtype == np.uint8 for images, _ in batches)
    for (images, labels), (original, original_labels) in zip(batches, plain):
        np.testing.assert_array_equal(labels, original_labels)
        # A crop's pixels lie between the image's own (bilinear); most crops are not the whole image.
        assert (images.min(axis=(1, 2)) >= original.min(axis=(1, 2))).all()
        assert (images.max(axis=(1, 2)) <= original.max(axis=(1, 2))).all()
        assert sum(not np.array_equal(a, b) for a, b in zip(images, original)) > 15
    assert inputs.Augmentation.from_config(TrainConfig(random_crop_padding=0, horizontal_flip=False, cutout=0,
                                                       random_resized_crop=0.5), [0, 0, 0]).resized_crop == 0.5
