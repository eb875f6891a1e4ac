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
