"""The original tutorial's training script, as plain single-process Keras: the speed baseline.

Same model (ResNet-18 with biased convs, Dense softmax), same recipe (SGD 0.005, momentum 0.9,
batch 100, float32, pixels / 255), data as in-memory NumPy arrays like ``cifar10.load_data()``.
Written out independently of ``pipeline`` on purpose, so that the baseline is the tutorial's
code path and not ours. Prints one JSON line with the measured training images/s.

    python benchmarks/seed_keras_baseline.py --images 3000
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402  (tf-keras, as the 2021 tutorial's TF 2.x)


def basic_block(x, filters, stride):
    shortcut = x
    x = keras.layers.Conv2D(filters, 3, stride, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(filters, 3, 1, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    if stride != 1:
        shortcut = keras.layers.Conv2D(filters, 1, stride)(shortcut)
    return keras.layers.Activation("relu")(keras.layers.add([x, shortcut]))


def resnet18():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 3, 1, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPool2D(2, 1, padding="same")(x)
    for filters, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = basic_block(x, filters, stride)
        x = basic_block(x, filters, 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


class Timer(keras.callbacks.Callback):
    """Times the steps after the first few (graph tracing and warm-up are not throughput)."""

    def __init__(self, skip):
        super().__init__()
        self.skip, self.start, self.timed = skip, None, 0

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.skip:
            self.start = time.perf_counter()
        elif batch + 1 > self.skip:
            self.timed += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="training images (batch 100 steps)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Pixel values do not change the speed of a dense conv net; random CIFAR-shaped data.
    x = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8).astype("float32") / 255.0
    y = rng.integers(0, 10, (args.images, 1))
    model = resnet18()
    model.compile(optimizer=keras.optimizers.SGD(0.005, momentum=0.9),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(5)])
    timer = Timer(args.warmup_steps)
    model.fit(x, y, batch_size=100, epochs=1, verbose=0, callbacks=[timer])
    seconds = time.perf_counter() - timer.start
    print(json.dumps({"script": "seed_keras_baseline", "images": timer.timed * 100, "seconds": round(seconds, 2),
                      "images_per_second": round(timer.timed * 100 / seconds, 1),
                      "parameters": model.count_params(), "tensorflow": tf.__version__}))


if __name__ == "__main__":
    main()
