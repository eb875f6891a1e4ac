"""Each worker's input pipeline: its Ray Data shard -> a tf.data.Dataset of augmented batches.

Ray Data streams the worker's shard of the Parquet files (a new file order every epoch) as whole
Arrow blocks; the pixels are viewed in place, shuffled through a local buffer, cut into batches
and augmented with vectorised numpy, a few whole-batch copies each (``shard_batches``,
``Augmentation``); tf.data prefetches, so the model never waits on the input. Pixels stay uint8
until the model's first layer: a quarter of the bytes of float32 on the way to a GPU.

Every worker must run the same number of steps, or the all-reduce of the shorter one hangs:
Ray Train splits the dataset into equal shards and we drop each shard's last partial batch, so
``steps = (rows // num_workers) // per_worker_batch_size`` on every worker (``steps_and_batches``).
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline.config import TrainConfig
from pipeline.data.manifest import images_from_column


def steps_and_batches(rows: int, num_workers: int, per_replica_batch_size: int, local_replicas: int,
                      drop_remainder: bool) -> tuple[int, int]:
    """(steps per epoch, batches each worker's dataset yields). A step takes one batch per replica
    from the worker's dataset: a worker mirrored over N GPUs consumes N batches per step, so
    counting its batches as steps would end the epoch after 1/N of the data."""
    rows_per_worker = rows // num_workers  # Ray's equal split drops the remainder rows
    if drop_remainder:
        steps = rows_per_worker // (per_replica_batch_size * local_replicas)
        return steps, steps * local_replicas
    # Evaluation keeps every row: the last step may leave some replicas without a batch, which
    # tf.distribute fills with empty ones.
    batches = -(-rows_per_worker // per_replica_batch_size)
    return -(-batches // local_replicas), batches


def shuffle_buffer_rows(train: TrainConfig, image_size: int) -> int:
    """Rows of a worker's shuffle buffer: ``train.shuffle_buffer_size``, fewer when that many
    images would hold more than ``train.shuffle_buffer_bytes`` of pixels."""
    return min(train.shuffle_buffer_size, train.shuffle_buffer_bytes // (image_size * image_size * 3))


def worker_seed(seed: Optional[int], rank: int, epoch: int = -1) -> Optional[int]:
    """A seed of its own for each worker (and epoch) derived from ``train.seed``; None (truly
    random) when ``train.seed`` is null. Workers must differ (each augments and shuffles its own
    rows) and epochs must differ (a shuffle buffer seeded alike every epoch repeats its order)."""
    if seed is None:
        return None
    return (seed * 1_000_003 + rank * 1009 + epoch + 1) % 2**31


def shard_to_dataset(shard, *, image_size: int, num_classes: int, batch_size: int, steps: int,
                     shuffle_buffer_size: int = 0, shuffle_seed: Optional[int] = None,
                     drop_remainder: bool = True, augmentation: Optional["Augmentation"] = None) -> tf.data.Dataset:
    """One epoch of the shard as a tf.data.Dataset of exactly ``steps`` (uint8 images, one-hot
    labels) batches, augmented by ``augmentation`` when given. Build a new one every epoch: each is
    a new Ray Data epoch (a new file order). ``shuffle_seed`` seeds the shuffle buffer and the
    augmentation (None: random).

    Deliberately finite (no ``repeat``): a repeated dataset's prefetch would open the next Ray
    epoch while another worker still reads the current one, and the streaming split's epoch
    barrier then deadlocks against the all-reduce of the checkpoint or the next step."""

    augment_rng = np.random.default_rng(None if shuffle_seed is None else [shuffle_seed, 1])

    def generate():
        produced, held = 0, None
        # The last batch is held back until Ray's iterator is exhausted, so that a consumer that
        # takes exactly ``steps`` batches and stops (Keras' validation) never leaves a Ray epoch
        # half-read: the streaming split moves to the next epoch together on every worker.
        for batch in shard_batches(shard, image_size=image_size, batch_size=batch_size,
                                   shuffle_buffer_size=shuffle_buffer_size, shuffle_seed=shuffle_seed,
                                   drop_remainder=drop_remainder):
            if produced == steps:
                continue  # a surplus batch (unequal shards): drain, never abandon, the iterator
            produced += 1
            if held is not None:
                yield held
            held = augmentation(*batch, augment_rng) if augmentation else batch
        if produced < steps:
            raise RuntimeError(f"the data shard gave {produced} batches, expected {steps}: the workers' "
                               "shards are unequal, which would hang the all-reduce")
        if held is not None:
            yield held

    dataset = batches_to_dataset(generate, image_size=image_size, num_classes=num_classes,
                                 resized_crops=bool(augmentation and augmentation.resized_crop))
    options = tf.data.Options()
    # Ray already gave this worker its own rows: tf.distribute must not shard them again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def batches_to_dataset(generate, *, image_size: int, num_classes: int, resized_crops: bool) -> tf.data.Dataset:
    """``generate()``'s (uint8 images, int32 labels[, crop boxes]) numpy batches as a tf.data.Dataset
    of (uint8 images, one-hot labels): with ``resized_crops``, each batch comes with the boxes that
    ``Augmentation`` drew and leaves as their crops (``resize_crops``)."""
    signature = (tf.TensorSpec((None, image_size, image_size, 3), tf.uint8), tf.TensorSpec((None,), tf.int32))
    if resized_crops:
        signature += (tf.TensorSpec((None, 4), tf.float32),)
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    if resized_crops:
        dataset = dataset.map(lambda images, labels, boxes: (resize_crops(images, boxes, image_size), labels),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.map(lambda images, labels: (images, tf.one_hot(labels, num_classes)))


def shard_batches(shard, *, image_size: int, batch_size: int, shuffle_buffer_size: int = 0,
                  shuffle_seed: Optional[int] = None, drop_remainder: bool = True,
                  part: Optional[tuple[int, int]] = None):
    """(uint8 images, int32 labels) batches of the shard, shuffled through a local buffer.

    Whole Arrow blocks come from Ray, not Ray's batches: one Python step per block, and the pixels
    are a view of the block's buffer (no Python object per row, no local shuffle on Arrow tables).
    Shuffling and cutting into batches are then a few vectorised numpy copies per block.
    ``part=(index, count)``: only the rows that ``in_part`` gives to that part."""
    rows = RowShuffler(shuffle_buffer_size, np.random.default_rng(shuffle_seed)) if shuffle_buffer_size else None
    batches = Rebatcher(batch_size)
    for block in shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        chunk = (images_from_column(block.column("image"), image_size),
                 block.column("label").to_numpy().astype(np.int32))
        if part is not None and part[1] > 1:
            keep = in_part(block.column("id"), *part)
            chunk = (chunk[0][keep], chunk[1][keep])
        yield from batches.add(*(rows.add(*chunk) if rows else chunk))
    if rows:
        yield from batches.add(*rows.drain())
    rest = batches.rest()
    if rest is not None and not drop_remainder:
        yield rest


def in_part(ids, index: int, count: int) -> np.ndarray:
    """Mask of the rows whose id hashes to part ``index`` of ``count``: every row falls to exactly
    one part by its id alone, whatever order (and block boundaries) the rows arrive in."""
    return np.fromiter((zlib.crc32(str(row_id).encode()) % count == index for row_id in ids.to_pylist()),
                       dtype=bool, count=len(ids))


class RowShuffler:
    """A streaming shuffle over ``capacity`` rows, vectorised (the semantics of tf.data's shuffle
    buffer): until the buffer is full rows only go in; then every incoming row takes the place of
    a uniformly chosen row of the buffer, which comes out; ``drain`` empties it in random order.
    Ray Data's ``local_shuffle_buffer_size`` does the same on Arrow tables, batch by batch; this
    one works on whole blocks and costs a gather and a scatter of their pixels."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity, self.rng = capacity, rng
        self.images: Optional[np.ndarray] = None
        self.labels: Optional[np.ndarray] = None
        self.filled = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.images is None:
            self.images = np.empty((self.capacity, *images.shape[1:]), images.dtype)
            self.labels = np.empty((self.capacity,), labels.dtype)
        free = min(self.capacity - self.filled, len(images))
        self.images[self.filled:self.filled + free] = images[:free]
        self.labels[self.filled:self.filled + free] = labels[:free]
        self.filled += free
        images, labels = images[free:], labels[free:]
        out_images, out_labels = [], []
        for start in range(0, len(images), self.capacity):  # a block larger than the buffer: in parts
            incoming_images, incoming_labels = images[start:start + self.capacity], labels[start:start + self.capacity]
            slots = self.rng.choice(self.capacity, size=len(incoming_images), replace=False)
            out_images.append(self.images[slots])
            out_labels.append(self.labels[slots])
            self.images[slots] = incoming_images
            self.labels[slots] = incoming_labels
        if not out_images:
            return images[:0], labels[:0]
        return np.concatenate(out_images), np.concatenate(out_labels)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        if self.images is None:
            return np.empty((0,), np.uint8), np.empty((0,), np.int32)
        order = self.rng.permutation(self.filled)
        images, labels = self.images[order], self.labels[order]
        self.filled = 0
        return images, labels


class Rebatcher:
    """Rows arriving in chunks of any size -> batches of exactly ``batch_size`` rows; ``rest``
    gives what is left at the end (fewer rows), or None."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, images: np.ndarray, labels: np.ndarray):
        if not len(images):
            return
        self.pending.append((images, labels))
        self.count += len(images)
        while self.count >= self.batch_size:
            yield self._take(self.batch_size)

    def rest(self):
        return self._take(self.count) if self.count else None

    def _take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        parts, needed = [], count
        while needed:
            images, labels = self.pending[0]
            if len(images) <= needed:
                parts.append(self.pending.pop(0))
                needed -= len(images)
            else:
                parts.append((images[:needed], labels[:needed]))
                self.pending[0] = (images[needed:], labels[needed:])
                needed = 0
        self.count -= count
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class Augmentation:
    """Random crop with zero padding, horizontal flip and cutout, on whole uint8 batches in numpy:
    one slice copy per distinct window for crop and flip together, one indexed fill for cutout.
    Several times faster than the same ops as a tf.data map, which left Ray Data and the model
    little of a worker's core (see BENCHMARKS.md, "One worker's input pipeline: whole files as
    blocks, augmentation in numpy"). A random resized crop (photos) draws its boxes here and is
    cut and resized by TensorFlow (``resize_crops``). Seeded per worker and epoch, so a run with
    ``train.seed`` augments alike every time."""

    def __init__(self, train: TrainConfig, fill_value):
        self.padding, self.flip, self.cutout = train.random_crop_padding, train.horizontal_flip, train.cutout
        self.resized_crop = train.random_resized_crop  # smallest share of the area; 0: off
        self.fill = np.round(np.asarray(fill_value, np.float64)).astype(np.uint8)

    @classmethod
    def from_config(cls, train: TrainConfig, fill_value) -> Optional["Augmentation"]:
        """None when the recipe augments nothing."""
        if not (train.random_crop_padding or train.horizontal_flip or train.cutout or train.random_resized_crop):
            return None
        return cls(train, fill_value)

    def __call__(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        """(images, labels), and with ``resized_crop`` the crop boxes that ``resize_crops`` applies
        in the tf.data pipeline (a per-image resize is TensorFlow's one batched op, not numpy's)."""
        if self.padding or self.flip:
            images = self.crop_and_flip(images, rng)
        if self.cutout:
            if not images.flags.writeable:
                images = images.copy()
            self.fill_cutout(images, rng)
        if self.resized_crop:
            return images, labels, resized_crop_boxes(len(images), self.resized_crop, rng)
        return images, labels

    def crop_and_flip(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Pad by ``padding`` zeros and cut a window of the original size at a random offset per
        image; mirror left-right with probability 1/2. A new array (the input may be read-only).

        One slice copy per distinct (offset, mirrored) pair, at most 2 (2p+1)^2 whatever the batch:
        each image's bytes are read once and written once, with no padded copy and no gather
        (those cost 5x at 224 px; BENCHMARKS.md, "A worker's input at 224 px")."""
        count, height, width, _ = images.shape
        pad = self.padding
        if pad:
            top = rng.integers(0, 2 * pad + 1, count) - pad  # the window's shift against the image
            left = rng.integers(0, 2 * pad + 1, count) - pad
        else:
            top = left = np.zeros(count, np.int64)
        mirrored = rng.random(count) < 0.5 if self.flip else np.zeros(count, bool)
        out = np.zeros_like(images) if pad else np.empty_like(images)
        groups = (top + pad) * (2 * pad + 1) * 2 + (left + pad) * 2 + mirrored
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            dy, dx, mirror = top[members[0]], left[members[0]], mirrored[members[0]]
            rows_out, rows_in = _overlap(dy, height)
            columns_out, columns_in = _overlap(dx, width)
            window = images[members, rows_in][:, :, columns_in]
            if mirror:  # the mirrored window: column c of the crop lands at width - 1 - c
                columns_out = slice(width - columns_out.stop, width - columns_out.start)
                window = window[:, :, ::-1]
            out[members, rows_out, columns_out] = window
        return out

    def fill_cutout(self, images: np.ndarray, rng: np.random.Generator) -> None:
        """One ``cutout`` x ``cutout`` square per image (centre anywhere, clipped at the border)
        set to the dataset's mean colour, i.e. zero after the model's normalisation. In place,
        writing only the squares' pixels (a mask of the whole batch costs more than the batch)."""
        count, height, width, _ = images.shape
        centre_row = rng.integers(0, height, count)
        centre_column = rng.integers(0, width, count)
        # Offsets d with |d| * 2 < cutout; an index past the border is clipped onto the border row
        # (or column), which lies inside the clipped square anyway.
        half = (self.cutout - 1) // 2
        offsets = np.arange(-half, half + 1)
        rows = np.clip(centre_row[:, None] + offsets, 0, height - 1)
        columns = np.clip(centre_column[:, None] + offsets, 0, width - 1)
        images[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]] = self.fill


def _overlap(shift: int, size: int) -> tuple[slice, slice]:
    """(output slice, input slice) of a window shifted by ``shift`` over a zero-padded axis of
    ``size``: output index i shows input index i + shift where that is inside the image."""
    return slice(max(0, -shift), size - max(0, shift)), slice(max(0, shift), size + min(0, shift))


# Aspect ratios (width / height) of a random resized crop: torchvision's and timm's default.
RESIZED_CROP_RATIOS = (3 / 4, 4 / 3)


def resized_crop_boxes(count: int, min_area: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` random crop boxes, float32 (y1, x1, y2, x2) in [0, 1] (``tf.image.crop_and_resize``'s
    form): each covers a share of the image's area drawn uniformly in [min_area, 1], with an aspect
    ratio drawn log-uniformly in RESIZED_CROP_RATIOS, at a uniform position. A side that would
    leave the image is clipped to it (torchvision retries instead; clipping needs no loop)."""
    area = rng.uniform(min_area, 1.0, count)
    ratio = np.exp(rng.uniform(*np.log(RESIZED_CROP_RATIOS), count))
    width, height = np.minimum(np.sqrt(area * ratio), 1.0), np.minimum(np.sqrt(area / ratio), 1.0)
    top, left = rng.random(count) * (1.0 - height), rng.random(count) * (1.0 - width)
    return np.stack([top, left, top + height, left + width], axis=1).astype(np.float32)


def resize_crops(images: tf.Tensor, boxes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Each image's box, resized (bilinear) back to image_size: uint8 in, uint8 out, so the bytes
    that travel to the device stay a quarter of float32's."""
    crops = tf.image.crop_and_resize(images, boxes, tf.range(tf.shape(images)[0]), (image_size, image_size))
    return tf.cast(tf.clip_by_value(tf.round(crops), 0.0, 255.0), tf.uint8)


def prefetch(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.prefetch(tf.data.AUTOTUNE)
