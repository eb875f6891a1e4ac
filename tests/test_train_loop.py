"""pipeline.train.loop pieces that run without Ray: the test evaluation's arithmetic."""

import numpy as np

import pipeline  # noqa: F401
import tf_keras as keras

from pipeline.train.loop import classification_sums


def test_classification_sums_match_keras_metrics_including_ties():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=200).astype(np.float32)
    probabilities[:20] = 0.1  # all classes tied: arg-max takes class 0, every label is in the top 5
    probabilities[20:25] = np.eye(10)[[3, 3, 4, 5, 6]]  # a zero probability for most labels: clipped
    labels = rng.integers(0, 10, 200)
    one_hot = np.eye(10, dtype=np.float32)[labels]
    loss, top1, top5, rows = classification_sums(probabilities.astype(np.float64), labels)
    assert rows == 200
    expected_loss = keras.losses.CategoricalCrossentropy(reduction="sum")(one_hot, probabilities).numpy()
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    accuracy = keras.metrics.CategoricalAccuracy()
    accuracy.update_state(one_hot, probabilities)
    top_k = keras.metrics.TopKCategoricalAccuracy(k=5)
    top_k.update_state(one_hot, probabilities)
    assert np.float32(top1 / rows) == accuracy.result().numpy()
    np.testing.assert_allclose(top5 / rows, top_k.result().numpy(), rtol=1e-6)
    assert top5 >= 20  # the tied rows


def test_top5_of_fewer_than_five_classes_is_every_row():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert list(classification_sums(probabilities, np.array([2, 0]))[1:]) == [0, 2, 2]


class Blocks:
    """A worker's view of a split read whole: its Arrow blocks in the order they reach it."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **_):
        return iter(self.blocks)


class OneWorkerOfTwo:
    """The strategy as one of two workers sees it; the all-reduce is done by the test."""
    num_replicas_in_sync = 2

    def __init__(self):
        self.sums = None

    def run(self, fn):
        return fn()

    def reduce(self, _, value, axis):
        self.sums = value.numpy()
        return value * 2  # as if the other worker had the same sums: only self.sums is compared


def test_a_split_read_whole_is_shared_out_exactly_whatever_order_the_blocks_arrive_in():
    # Shard files of very different sizes; Ray Data hands blocks over as read tasks finish, so two
    # workers see them in different orders. Between them they must evaluate every row once.
    import pyarrow as pa

    from pipeline.train.loop import evaluate_split

    rng = np.random.default_rng(0)
    size, classes = 4, 3
    blocks, start = [], 0
    for rows in (1, 37, 5, 120, 2, 64):
        images = rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8)
        blocks.append(pa.table({"id": [f"img-{start + i}.png" for i in range(rows)],
                                "label": rng.integers(0, classes, rows),
                                "image": [row.tobytes() for row in images]}))
        start += rows
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((size, size, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(classes, activation="softmax")])
    orders = ([0, 1, 2, 3, 4, 5], [3, 5, 1, 0, 4, 2])
    totals = np.zeros(4)
    for rank, order in enumerate(orders):
        strategy = OneWorkerOfTwo()
        evaluate_split(model, Blocks([blocks[i] for i in order]), strategy, rank, 2, image_size=size, batch_size=16)
        totals += strategy.sums
    everything = pa.concat_tables(blocks)
    images = np.stack([np.frombuffer(b, np.uint8).reshape(size, size, 3) for b in everything["image"].to_pylist()])
    probabilities = model.predict(images.astype(np.float32), verbose=0).astype(np.float64)
    expected = classification_sums(probabilities, everything["label"].to_numpy())
    assert totals[3] == len(images) == 229
    np.testing.assert_allclose(totals, expected, rtol=1e-5)
