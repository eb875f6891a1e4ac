"""``train_loop_per_worker``: what every Ray Train worker runs.

One worker = one TensorFlow replica under ``MultiWorkerMirroredStrategy`` (Ray Train sets
``TF_CONFIG``). Each worker streams its own Ray Data shard, Keras ``fit`` all-reduces the
gradients, and every worker reports each epoch's metrics to Ray Train; rank 0 attaches the
checkpoint. On a restart (same run name, or a worker failure) the loop resumes from
``ray.train.get_checkpoint()``: weights, optimizer slots, step counter (hence the schedule
position), epoch counter and the metric history.

After the last epoch every worker copies the weights into a plain float32 model and evaluates
its share of the test split (one all-reduce adds the results up); rank 0 exports that model, so
the reported test accuracy is the accuracy of the file users serve. The callbacks (reports,
checkpoints, progress, TensorBoard) are in ``callbacks.py``, the input pipeline in ``inputs.py``.

``train_loop_per_worker`` reads as its steps, one function each: ``set_up_devices``,
``make_inputs``, ``build_model``, ``restore``, ``fit``, ``evaluate_and_export``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import ray.train
import tensorflow as tf
import tf_keras as keras

from pipeline import storage
from pipeline.config import (Config, batch_sizes, from_dict, per_replica_batch_size, replicas_per_worker,
                             scaled_learning_rate)
from pipeline.data.manifest import DatasetInfo
from pipeline.models.registry import create_model
from pipeline.models.saving import model_metadata, predict_function, restore_checkpoint, save_export
from pipeline.train import devices, inputs
from pipeline.train.callbacks import (CheckpointInsideEpochs, MovingAverage, ProgressLog, ReportToRayTrain,
                                      StallWatchdog, TensorBoardToStorage)
from pipeline.train.history import write_history
from pipeline.train.schedules import schedule_from_config

log = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict) -> None:
    config = from_dict(loop_config["config"])
    dataset = DatasetInfo.from_dict(loop_config["dataset"])
    run_dir = loop_config["run_dir"]

    worker = set_up_devices(config, run_dir)
    data = make_inputs(config, dataset, worker)
    model, optimizer = build_model(config, dataset, worker, data.train_steps)
    start = restore(model, optimizer, loop_config.get("start_from"), config, worker, data.train_steps, run_dir)
    metadata = model_metadata(kind="checkpoint", class_names=dataset.class_names, image_size=dataset.image_size,
                              resize=dataset.resize, config=loop_config["config"], mean=dataset.mean, std=dataset.std,
                              precision=worker.precision, identity=dataset.identity)
    if worker.rank == 0:
        record_attempt(run_dir, worker.world_size, start.epoch, start.step)
    average = None
    if config.train.ema_momentum:
        average = MovingAverage(config.train.ema_momentum, steps_per_epoch=data.train_steps, weights=start.average)
    if not fit(model, config, data, worker, start, metadata, run_dir, average):
        return  # diverged: every worker stops here alike; the driver raises TrainingDiverged from the history

    if average is not None:
        average.catch_up()
    # Every worker reads the weights: BatchNorm's moving statistics are on-read-synchronised
    # variables, so reading them is an all-reduce that a lone rank 0 would wait on forever.
    weights = model.get_weights() if average is None or average.weights is None else average.weights
    evaluate_and_export(weights, config, dataset, metadata, run_dir, worker)


@dataclasses.dataclass(frozen=True)
class Worker:
    """This worker's place in the group and what it computes with, the same on every worker."""

    rank: int
    world_size: int
    local_replicas: int  # one per GPU the worker sees, else one
    strategy: tf.distribute.MultiWorkerMirroredStrategy
    precision: str  # fp32, bf16 or fp16
    steps_per_execution: int
    jit_compile: bool


def set_up_devices(config: Config, run_dir: str) -> Worker:
    """Devices, threads, seed, strategy and precision (see pipeline/train/devices.py), recorded in
    ``workers/rank-NNN.json``. Call on every worker alike: the precision is agreed by all-reduce."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    scaling = config.scaling
    gpus = devices.local_gpus(scaling, rank)
    # Several workers on one node would each start a full-size thread pool and thrash the cores.
    threads = max(1, (os.cpu_count() or 1) // context.get_local_world_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    if config.train.seed is not None:
        keras.utils.set_random_seed(config.train.seed)  # same initial weights on every worker

    collective = devices.collective(scaling.collective, scaling.use_gpu, scaling.gpus_per_worker)
    strategy = devices.make_strategy(collective)
    local_replicas = replicas_per_worker(config)
    if strategy.num_replicas_in_sync != world_size * local_replicas:
        raise RuntimeError(f"worker {rank}: {strategy.num_replicas_in_sync} replicas in sync, expected "
                           f"{world_size} worker(s) x {local_replicas}; the workers see different devices")
    precision = devices.agreed_precision(strategy, config.train.precision, devices.fast_precisions(gpus))
    keras.mixed_precision.set_global_policy(devices.PRECISION_POLICIES[precision])
    steps_per_execution = devices.steps_per_execution(config.train.steps_per_execution, scaling.use_gpu)
    jit_compile = devices.jit_compile(config.train.jit_compile, scaling.use_gpu)
    storage.write_json(storage.join(run_dir, "workers", f"rank-{rank:03d}.json"), devices.worker_record(
        context, gpus, strategy, precision=precision, collective=collective,
        steps_per_execution=steps_per_execution, jit_compile=jit_compile))
    return Worker(rank=rank, world_size=world_size, local_replicas=local_replicas, strategy=strategy,
                  precision=precision, steps_per_execution=steps_per_execution, jit_compile=jit_compile)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """This worker's input: fresh, finite datasets of its Ray Data shards for every epoch (see
    inputs.shard_to_dataset); each step takes one batch per local replica."""

    config: Config
    dataset: DatasetInfo
    worker: Worker
    replica_batch: int
    global_batch: int
    train_steps: int  # per epoch
    validation_steps: int | None  # None without a val split
    validation_batches: int | None
    augmentation: inputs.Augmentation | None

    def train(self, epoch: int, steps: int):
        def dataset_fn(_):
            return inputs.prefetch(inputs.shard_to_dataset(
                ray.train.get_dataset_shard("train"), image_size=self.dataset.image_size,
                num_classes=self.dataset.num_classes, batch_size=self.replica_batch,
                steps=steps * self.worker.local_replicas,
                shuffle_buffer_size=inputs.shuffle_buffer_rows(self.config.train, self.dataset.image_size),
                shuffle_seed=inputs.worker_seed(self.config.train.seed, self.worker.rank, epoch),
                augmentation=self.augmentation))

        return self.worker.strategy.distribute_datasets_from_function(dataset_fn)

    def validation(self):
        if self.validation_steps is None:
            return None

        def dataset_fn(_):
            return inputs.prefetch(inputs.shard_to_dataset(
                ray.train.get_dataset_shard("val"), image_size=self.dataset.image_size,
                num_classes=self.dataset.num_classes, batch_size=self.replica_batch,
                steps=self.validation_batches, drop_remainder=False))

        return self.worker.strategy.distribute_datasets_from_function(dataset_fn)


def make_inputs(config: Config, dataset: DatasetInfo, worker: Worker) -> Inputs:
    # The actual worker count: an elastic run (scaling.min_workers) may have fewer than configured;
    # the global batch stays, each worker's share changes.
    _, global_batch = batch_sizes(config, worker.world_size)
    replica_batch = per_replica_batch_size(config, worker.world_size)
    train_steps, _ = inputs.steps_and_batches(
        dataset.rows["train"], worker.world_size, replica_batch, worker.local_replicas, drop_remainder=True)
    if train_steps == 0:
        raise ValueError(f"the train split ({dataset.rows['train']} rows) is smaller than one global "
                         f"batch ({global_batch}); lower train.global_batch_size")
    validation_steps, validation_batches = None, None
    if dataset.has("val"):
        validation_steps, validation_batches = inputs.steps_and_batches(
            dataset.rows["val"], worker.world_size, replica_batch, worker.local_replicas, drop_remainder=False)
    # Shuffling and augmentation draw from a seed per worker and epoch (each worker sees other
    # images anyway); train.seed null: random.
    augmentation = inputs.Augmentation.from_config(config.train, dataset.mean or [0, 0, 0])
    return Inputs(config=config, dataset=dataset, worker=worker, replica_batch=replica_batch,
                  global_batch=global_batch, train_steps=train_steps, validation_steps=validation_steps,
                  validation_batches=validation_batches, augmentation=augmentation)


def build_model(config: Config, dataset: DatasetInfo, worker: Worker, steps_per_epoch: int):
    """The compiled model and its optimizer, built in the strategy's scope (mirrored variables)."""
    with worker.strategy.scope():
        model = create_model(config.model, num_classes=dataset.num_classes, image_size=dataset.image_size,
                             mean=dataset.mean, std=dataset.std)
        optimizer = make_optimizer(config, steps_per_epoch, worker.precision)
        model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(
                          label_smoothing=config.train.label_smoothing),
                      metrics=metrics(dataset.num_classes), steps_per_execution=worker.steps_per_execution,
                      jit_compile=worker.jit_compile)
        optimizer.build(model.trainable_variables)  # slots exist before a restore fills them
    # Per-step logs (progress lines) of the local replica: Keras' default sums them over replicas
    # (top-5 accuracy 2.0 with two workers). Epoch logs are reduced across replicas either way.
    model.distribute_reduction_method = "first"
    return model, optimizer


@dataclasses.dataclass(frozen=True)
class Start:
    """Where this attempt of the run starts training, and the metric history before it."""

    epoch: int = 0
    step: int = 0  # within ``epoch``: a checkpoint taken inside an epoch resumes there
    history: list[dict] = dataclasses.field(default_factory=list)  # appended to by ReportToRayTrain
    average: list | None = None  # the moving average of the weights (train.ema_momentum), if kept


def restore(model, optimizer, start_from, config: Config, worker: Worker, steps_per_epoch: int,
            run_dir: str) -> Start:
    """Weights, optimizer slots and step counter from the checkpoint this attempt starts from."""
    # The run's own latest checkpoint (a restart, or the same run name again) wins over the one a
    # new run was asked to start from (population-based training hands over another trial's).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        checkpoint = start_from
    if checkpoint is None:
        return Start()
    with checkpoint.as_directory() as directory:
        state = restore_checkpoint(directory, model=model, optimizer=optimizer)
    # A checkpoint inside an epoch resumes at its step (the optimizer's step counter, restored
    # with it, keeps the schedule exact); the epoch is finished with the steps it had left.
    # Written with another worker count (elastic), an epoch may have a step fewer now.
    start = Start(epoch=state["epoch"], step=min(state.get("step", 0), steps_per_epoch - 1), history=state["history"],
                  average=state["average"])
    at = f" step {start.step}/{steps_per_epoch}" if start.step else ""
    log.info(f"rank {worker.rank} resumed from {checkpoint.path} at epoch {start.epoch}/{config.train.epochs}{at}")
    if worker.rank == 0:
        # A run started from another run's checkpoint has its history from the first moment,
        # even if no epoch is left to train.
        write_history(start.history, run_dir)
    return start


def fit(model, config: Config, data: Inputs, worker: Worker, start: Start, metadata: dict, run_dir: str,
        average: MovingAverage | None = None) -> bool:
    """Train from ``start`` to train.epochs, one ``model.fit`` per epoch; False if the weights diverged."""
    reporter = ReportToRayTrain(config=config, metadata=metadata, history=start.history, run_dir=run_dir,
                                rank=worker.rank, images_per_epoch=data.train_steps * data.global_batch,
                                steps_per_epoch=data.train_steps, precision=worker.precision,
                                workers=worker.world_size, average=average)
    inside = CheckpointInsideEpochs(reporter, steps_per_epoch=data.train_steps,
                                    every_steps=config.train.checkpoint_every_steps,
                                    check_steps=config.train.preemption_check_steps,
                                    score_key="val_accuracy" if data.dataset.has("val") else "accuracy")
    watchdog = StallWatchdog(config.train.stall_timeout_seconds)
    # The average first: validation and checkpoints at a step see it updated to that step.
    callbacks = ([] if average is None else [average]) + [reporter, inside, watchdog]
    if worker.rank == 0:
        callbacks.append(TensorBoardToStorage(storage.join(run_dir, "tensorboard")))
        if config.run.progress_seconds:
            callbacks.append(ProgressLog(config.train.epochs, data.train_steps, data.global_batch,
                                         config.run.progress_seconds))
    step_counters = [callback for callback in callbacks if hasattr(callback, "first_step")]

    for epoch in range(start.epoch, config.train.epochs):
        first_step = start.step if epoch == start.epoch else 0
        steps = data.train_steps - first_step
        for callback in step_counters:
            callback.first_step = first_step
        # Fresh datasets per epoch; Keras keeps its traced train step across these calls, the
        # optimizer keeps its step counter.
        validation = data.validation()
        model.fit(data.train(epoch, steps), initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps,
                  validation_data=validation, validation_steps=data.validation_steps, callbacks=callbacks,
                  verbose=2 if worker.rank == 0 else 0)
        if reporter.diverged:
            break
    watchdog.disarm()
    return not reporter.diverged


def record_attempt(run_dir: str, workers: int, epoch: int, step: int) -> None:
    """One line per start of the worker group (``attempts.json``): with how many workers, and from
    where; restarts after a failure or a preemption, and an elastic run's resizes, each add one."""
    path = storage.join(run_dir, "attempts.json")
    attempts = storage.read_json(path) if storage.exists(path) else []
    attempts.append({"workers": workers, "from_epoch": epoch, "from_step": step,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    storage.write_json(path, attempts)


def make_optimizer(config, steps_per_epoch: int, precision: str):
    train = config.train
    schedule = schedule_from_config(train, scaled_learning_rate(config), steps_per_epoch)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=train.momentum, nesterov=train.nesterov,
                                     weight_decay=train.weight_decay or None)
    if train.weight_decay:
        # Decaying BatchNorm scales/offsets and biases only fights the normalisation; standard practice.
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if precision == "fp16":
        # float16 gradients underflow without a dynamic loss scale; bfloat16 has float32's range.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def metrics(num_classes: int) -> list:
    return [keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy")]


def evaluate_and_export(weights, config: Config, dataset: DatasetInfo, metadata: dict, run_dir: str,
                        worker: Worker) -> None:
    """Every worker, after training: the weights in a plain float32 model (the one users serve),
    its test evaluation shared out among the workers, then rank 0 exports it with the result."""
    keras.mixed_precision.set_global_policy("float32")
    serving_model = create_model(config.model, num_classes=dataset.num_classes, image_size=dataset.image_size,
                                 mean=dataset.mean, std=dataset.std)
    serving_model.set_weights(weights)

    split = "test" if dataset.has("test") else "val"
    evaluation = {"split": split}
    if dataset.has(split):
        started = time.perf_counter()
        evaluation.update(evaluate_split(serving_model, ray.train.get_dataset_shard(f"{split}_full"), worker.strategy,
                                         worker.rank, worker.world_size, image_size=dataset.image_size,
                                         batch_size=batch_sizes(config, worker.world_size)[0],
                                         flip=config.model.test_time_flip))
        evaluation["seconds"] = round(time.perf_counter() - started, 3)
    if worker.rank == 0:
        export_dir = save_export(serving_model, {**metadata, "evaluation": evaluation}, storage.join(run_dir, "export"))
        evaluation["export"] = export_dir
        storage.write_json(storage.join(run_dir, "evaluation.json"), evaluation)


def evaluate_split(model, shard, strategy, rank: int, world_size: int, *, image_size: int, batch_size: int,
                   flip: bool = False) -> dict:
    """Loss, accuracy and top-5 accuracy of ``model`` over every row of an unsplit dataset: each
    worker reads all of it and predicts the rows whose id falls to its rank (all cores busy, not
    rank 0's share alone), then one all-reduce adds up the sums. Shared out by row id, not by batch
    number: Ray Data delivers blocks as read tasks finish, in an order that differs between
    workers. The metrics are Keras' own (CategoricalCrossentropy on probabilities,
    CategoricalAccuracy, TopKCategoricalAccuracy)."""
    sums = np.zeros(4)  # loss, top-1 hits, top-5 hits, rows
    predict = predict_function(model, flip)  # model.test_time_flip, as the export will be used
    for images, labels in inputs.shard_batches(shard, image_size=image_size, batch_size=batch_size,
                                               drop_remainder=False, part=(rank, world_size)):
        probabilities = predict(images.astype(np.float32)).numpy().astype(np.float64)
        sums += classification_sums(probabilities, labels)
    # Each local replica contributes the worker's sums once: divide the replicas back out.
    local_replicas = strategy.num_replicas_in_sync // world_size
    totals = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(sums)), axis=None)
    loss, top1, top5, rows = totals.numpy() / local_replicas
    return {"loss": float(loss / rows), "accuracy": float(top1 / rows), "top5_accuracy": float(top5 / rows),
            "rows": int(round(rows))}


def classification_sums(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[summed cross-entropy, top-1 hits, top-5 hits, rows] of a batch, as Keras computes them:
    probabilities renormalised and clipped to [1e-7, 1 - 1e-7]; arg-max ties go to the lower
    class; a label is in the top k unless k classes score strictly higher (``tf.math.in_top_k``)."""
    rows = np.arange(len(labels))
    normalised = np.clip(probabilities / probabilities.sum(axis=1, keepdims=True), 1e-7, 1 - 1e-7)
    loss = -np.log(normalised[rows, labels]).sum()
    top1 = (probabilities.argmax(axis=1) == labels).sum()
    higher = (probabilities > probabilities[rows, labels][:, None]).sum(axis=1)
    top5 = (higher < min(5, probabilities.shape[1])).sum()
    return np.array([loss, top1, top5, len(labels)], dtype=np.float64)
