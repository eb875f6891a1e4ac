import os
import subprocess
import sys

import pytest

import pipeline  # noqa: F401
import tf_keras as keras

from pipeline.config import ConfigError, batch_sizes, load_config, per_replica_batch_size, replicas_per_worker
from pipeline.train import devices, inputs
from pipeline.train.callbacks import CheckpointInsideEpochs, ProgressLog, ReportToRayTrain, TensorBoardToStorage

from conftest import REPO


class FakeGpu:
    pass


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(requested):
    assert devices.choose_precision(requested, set()) == requested
    assert devices.agreed_precision(None, requested, set()) == requested  # no collective needed


def test_auto_on_cpus_follows_bf16_units(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: True)
    assert devices.choose_precision("auto", devices.fast_precisions([])) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: False)
    assert devices.choose_precision("auto", devices.fast_precisions([])) == "fp32"


@pytest.mark.parametrize("capability, expected", [((6, 1), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_gpus_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(devices.tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capability})
    assert devices.choose_precision("auto", devices.fast_precisions([FakeGpu()])) == expected


@pytest.mark.parametrize("everywhere, expected", [({"bf16", "fp16"}, "bf16"), ({"fp16"}, "fp16"), ({"bf16"}, "bf16"),
                                                  (set(), "fp32")])
def test_auto_takes_what_every_worker_runs_fast(everywhere, expected):
    # An A100 (bf16, fp16) with a V100 (fp16): the intersection is {fp16}, so both train in fp16.
    assert devices.choose_precision("auto", everywhere) == expected


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f amx_bf16 amx_tile\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert devices.cpu_has_bf16_units()
    cpuinfo.write_text("processor : 0\nflags : fpu avx avx2 fma\n")
    assert not devices.cpu_has_bf16_units()


@pytest.mark.parametrize("requested, use_gpu, gpus, expected", [
    ("auto", True, 1, "nccl"), ("auto", True, 2, "nccl"), ("auto", False, 1, "ring"), ("ring", True, 1, "ring"),
    ("nccl", True, 1, "nccl"),
    ("auto", True, 0.5, "ring"),  # workers sharing a GPU: NCCL would refuse the duplicate device
])
def test_auto_collective_is_nccl_between_workers_with_gpus_of_their_own(requested, use_gpu, gpus, expected):
    assert devices.collective(requested, use_gpu, gpus) == expected


def test_nccl_between_workers_that_share_a_gpu_is_refused_before_work():
    with pytest.raises(ConfigError, match=r"collective=nccl with scaling.gpus_per_worker=0.5: .*Duplicate GPU"):
        load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "scaling.num_workers=2",
                           "scaling.collective=nccl"])
    load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "scaling.collective=nccl"])


def test_execution_settings_follow_the_config_not_the_worker():
    # Decided from use_gpu, the same on every worker: a different traced step (XLA, steps per
    # call) on one worker would pair its collectives with the wrong ones of the others.
    assert devices.steps_per_execution("auto", True) == devices.GPU_STEPS_PER_EXECUTION > 1
    assert devices.steps_per_execution("auto", False) == 1
    assert devices.steps_per_execution(4, False) == 4
    assert devices.jit_compile("auto", True) is True and devices.jit_compile("auto", False) is False
    assert devices.jit_compile(True, False) is True


def test_two_gpus_per_worker_split_the_batch_per_replica():
    config = load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=2", "scaling.num_workers=2",
                                "train.global_batch_size=256"])
    assert replicas_per_worker(config) == 2
    assert batch_sizes(config) == (128, 256) and per_replica_batch_size(config) == 64
    # 45,000 rows: 22,500 per worker; 175 steps of 2 x 64 each: the whole shard, not half of it.
    assert inputs.steps_and_batches(45000, 2, 64, 2, drop_remainder=True) == (175, 350)
    fractional = load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.25"])
    assert replicas_per_worker(fractional) == 1 and per_replica_batch_size(fractional) == 100
    cpu = load_config(None, ["scaling.gpus_per_worker=2"])  # use_gpu false: GPUs not asked for
    assert replicas_per_worker(cpu) == 1
    with pytest.raises(ConfigError, match="whole number of GPUs"):
        load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=1.5"])
    with pytest.raises(ConfigError, match="not divisible by scaling.gpus_per_worker=3"):
        load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=3", "train.global_batch_size=128"])


def test_our_callbacks_keep_steps_asynchronous(tmp_path):
    # tf-keras converts every step's logs to numpy (a host sync) unless every callback with batch
    # hooks accepts tensors; fit adds History and the progress bar, which do.
    config = load_config(None, [])
    reporter = ReportToRayTrain(config=config, metadata={}, history=[], run_dir=str(tmp_path), rank=0,
                                images_per_epoch=100, steps_per_epoch=10, precision="fp32")
    callbacks = [
        reporter,
        CheckpointInsideEpochs(reporter, steps_per_epoch=10, every_steps=5, check_steps=1, score_key="accuracy"),
        ProgressLog(epochs=1, steps=10, global_batch=10, interval=30),
        TensorBoardToStorage(str(tmp_path / "tensorboard")),
    ]
    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=True,
                                                 model=keras.Sequential([keras.layers.Dense(1)]), verbose=2,
                                                 epochs=1, steps=10)
    assert callback_list._should_call_train_batch_hooks
    assert callback_list._batch_hooks_support_tf_logs


TWO_REPLICAS = r"""
import sys
import numpy as np
import pipeline
import pyarrow as pa
import tensorflow as tf
import tf_keras as keras
from tensorflow.python.distribute.collective_all_reduce_strategy import CollectiveAllReduceStrategy
from pipeline.train import inputs

# One worker mirrored over two devices, as a worker holding two GPUs is (two logical CPUs here).
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = CollectiveAllReduceStrategy._from_local_devices(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2

class Shard:  # the slice of ray.data.DataIterator that shard_to_dataset uses
    def __init__(self, rows):
        self.rows, self.served = rows, 0
    def iter_batches(self, batch_size, batch_format, **_):
        assert batch_size is None and batch_format == "pyarrow"  # whole blocks, of 7 rows here
        for start in range(0, self.rows, 7):
            count = min(7, self.rows - start)
            self.served += count
            labels = np.arange(start, start + count) % 2
            images = [bytes([255 * int(label)] * 48) for label in labels]
            yield pa.table({"image": pa.array(images, pa.binary()), "label": labels})

per_replica, replicas = 8, 2
train, val = Shard(100), Shard(41)
train_steps, train_batches = inputs.steps_and_batches(train.rows, 1, per_replica, replicas, True)
val_steps, val_batches = inputs.steps_and_batches(val.rows, 1, per_replica, replicas, False)

def dataset(shard, batches, drop):
    return lambda _: inputs.shard_to_dataset(shard, image_size=4, num_classes=2, batch_size=per_replica,
                                             steps=batches, drop_remainder=drop)

with strategy.scope():
    model = keras.Sequential([keras.layers.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.5), "categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=2)
model.fit(strategy.distribute_datasets_from_function(dataset(train, train_batches, True)),
          steps_per_epoch=train_steps, epochs=1, verbose=0)
accuracy = model.evaluate(strategy.distribute_datasets_from_function(dataset(val, val_batches, False)),
                          steps=val_steps, verbose=0, return_dict=True)["accuracy"]
print("RESULT", train_steps, int(model.optimizer.iterations.numpy()), train.served, val.served, accuracy)
"""


def test_a_worker_with_two_replicas_trains_on_its_whole_shard_and_evaluates_every_row(tmp_path):
    # Batches counted per replica: 100 rows at 2 x 8 per step are 6 steps of 12 batches (96 rows);
    # counted per worker, the dataset would end after half the steps. Evaluation: 41 rows are 6
    # batches, the last of 1 row; 3 steps, the last leaving one replica an empty batch.
    script = tmp_path / "two_replicas.py"
    script.write_text(TWO_REPLICAS)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT")), None)
    assert line, result.stdout[-2000:] + result.stderr[-4000:]
    steps, iterations, train_served, val_served, accuracy = line.split()[1:]
    assert (int(steps), int(iterations), int(train_served), int(val_served)) == (6, 6, 100, 41)
    assert float(accuracy) == 1.0  # black vs white: learnt, and counted over all 41 rows
