"""Where a CPU training step goes: the pipeline against the bare Keras script, and both against
this CPU's arithmetic limit, in one run.

    python benchmarks/train_profile.py --source ../shared/data/cifar10-jpeg-train.tar.gz

The seed recipe (ResNet-18 with biased convs, fp32, batch 100; the recipe the bare script
reproduces), each measurement its own process, one after another:

1. ``bare Keras``: benchmarks/seed_keras_baseline.py with oneDNN on (the baseline);
2. ``pipeline step, plain``: the pipeline's own model and compile (``create_model``,
   ``make_optimizer``, the loop's metrics) fitted on one in-memory batch repeated, in one process;
3. ``pipeline step, beside an idle Ray``: the same, after the process has started the embedded
   Ray a ``jobs/train.py`` run starts (``pipeline.runtime.connect``) and let it settle: what Ray's
   own processes cost a step on these cores while they do nothing for it;
4. ``pipeline step, MultiWorkerMirroredStrategy``: the plain step under the strategy every Ray
   Train worker runs (one worker, ring all-reduce), in one process: what the strategy costs;
5. ``pipeline``: ``jobs/train.py`` with one Ray Train worker, 2 epochs on a class-balanced
   subset, ``steady_images_per_second`` of the second epoch (Ray Data input, callbacks, Ray's
   processes beside it).

``--repeats`` rounds of the five, interleaved; the median of each is reported with its rounds.

The arithmetic: FLOPs per image from TensorFlow's profiler on the model's forward graph (x3 for a
training step: forward, gradients of activations and of weights), against the float32 rate of a
large matmul measured here with the same two threads (the practical peak) and the nominal peak
at the clock /proc/cpuinfo reports (cores x clock x 32 float32 FLOPs per cycle: Zen 4's two
256-bit FMA pipes; the cores may boost above that clock, so the matmul can exceed it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- in-process parts

def seed_config():
    from pipeline.config import load_config

    return load_config(os.path.join(REPO, "configs/seed.yaml"), ["train.precision=fp32"])


def build(config, steps: int):
    import tf_keras as keras

    from pipeline.models.registry import create_model
    from pipeline.train.loop import make_optimizer, metrics

    model = create_model(config.model, num_classes=10, image_size=32, mean=None, std=None)
    model.compile(optimizer=make_optimizer(config, steps, "fp32"),
                  loss=keras.losses.CategoricalCrossentropy(), metrics=metrics(10))
    return model


def measure_steps(args) -> dict:
    """The pipeline's model, compiled as the training loop compiles it, on one in-memory batch."""
    import numpy as np

    import pipeline  # noqa: F401
    import tensorflow as tf
    import tf_keras as keras

    from pipeline.train import devices

    if args.beside_ray:
        from pipeline import runtime

        runtime.connect()
        # Ray starts its dashboard, agents and prestarted workers over the first seconds; the
        # step is measured beside them once they idle, as a training worker runs beside them.
        time.sleep(args.beside_ray)
    config = seed_config()
    batch = config.train.global_batch_size
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = tf.one_hot(np.arange(batch) % 10, 10)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat(args.warmup + args.steps)
    if args.strategy == "mwms":
        strategy = devices.make_strategy(devices.collective("auto", False))
        data = data.with_options(_no_autoshard(tf))
    else:
        strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build(config, args.warmup + args.steps)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            times.append(time.perf_counter())

    model.fit(data, epochs=1, verbose=0, callbacks=[Clock()])
    seconds = times[-1] - times[args.warmup - 1]
    return {"strategy": args.strategy, "beside_ray": bool(args.beside_ray), "steps": args.steps, "batch": batch,
            "images_per_second": round(args.steps * batch / seconds, 1)}


def _no_autoshard(tf):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def arithmetic(args) -> dict:
    """Forward FLOPs per image of the seed model, and the float32 matmul rate on this CPU."""
    import pipeline  # noqa: F401
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = build(seed_config(), 1)
    forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, 32, 32, 3], tf.float32))
    graph = convert_variables_to_constants_v2(forward).graph
    options = (tf.compat.v1.profiler.ProfileOptionBuilder(tf.compat.v1.profiler.ProfileOptionBuilder.float_operation())
               .with_empty_output().build())
    flops = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                          options=options).total_float_ops
    size = 2048
    a, b = tf.random.uniform([size, size]), tf.random.uniform([size, size])
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.linalg.matmul(a, b)))
    matmul(a, b).numpy()  # warm-up
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < 5:
        matmul(a, b).numpy()
        count += 1
    gflops = 2 * size**3 * count / (time.perf_counter() - started) / 1e9
    return {"forward_flops_per_image": int(flops), "matmul_gflops": round(gflops, 1)}


# ----------------------------------------------------------------------------- driver

def child(mode: str, args, *extra) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup",
               str(args.warmup), *extra]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def nominal_gflops() -> tuple[float, int, float]:
    """(GFLOP/s, cores, GHz): cores x clock (from /proc/cpuinfo) x 32 float32 FLOPs per cycle."""
    megahertz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    cores = len(os.sched_getaffinity(0))
    ghz = (sum(megahertz) / len(megahertz) / 1000) if megahertz else 0.0
    return cores * ghz * 32, cores, ghz


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="CIFAR-10 archive or image folder (for the pipeline run)")
    parser.add_argument("--work", default="/tmp/train-profile")
    parser.add_argument("--images-per-class", type=int, default=300, help="subset for the pipeline run")
    parser.add_argument("--baseline-images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=25, help="timed steps of the in-process step runs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all measurements; medians reported")
    parser.add_argument("--json", default=os.path.join(REPO, "artifacts/benchmarks/train-profile.json"))
    parser.add_argument("--child", choices=["steps", "arithmetic"], help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--beside-ray", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_steps(args) if args.child == "steps" else arithmetic(args)))
        return
    if not args.source:
        parser.error("--source is required")

    def bare() -> float:
        command = [sys.executable, "benchmarks/seed_keras_baseline.py", "--images", str(args.baseline_images)]
        print("$", "TF_ENABLE_ONEDNN_OPTS=1", " ".join(command), flush=True)
        result = subprocess.run(command, cwd=REPO, env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"},
                                capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]

    def pipeline_run() -> float:
        name = "profile-seed"
        command = [sys.executable, "jobs/train.py", "--config", "configs/seed.yaml",
                   "--set", f"data.source={os.path.abspath(args.source)}",
                   "--set", f"data.max_images_per_class={args.images_per_class}",
                   "--set", f"data.output={args.work}/data", "--set", f"run.storage_path={args.work}/runs",
                   "--set", f"run.name={name}", "--set", "train.epochs=2", "--set", "train.precision=fp32"]
        subprocess.run(["rm", "-rf", os.path.join(args.work, "runs", name)])
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.load(open(os.path.join(args.work, "runs", name, "history.json")))[-1]["steady_images_per_second"]

    measurements = [
        ("bare Keras script, oneDNN (baseline)", bare),
        ("pipeline step, plain", lambda: child("steps", args, "--strategy", "plain")["images_per_second"]),
        ("pipeline step, plain, beside an idle Ray",
         lambda: child("steps", args, "--strategy", "plain", "--beside-ray", "20")["images_per_second"]),
        ("pipeline step, MultiWorkerMirroredStrategy",
         lambda: child("steps", args, "--strategy", "mwms")["images_per_second"]),
        ("pipeline, jobs/train.py, 1 Ray Train worker", pipeline_run)]
    # Rounds of all five, interleaved, so that a slow spell of the machine (this VM has whole
    # seconds at half speed) hits every row alike; each row's figure is its median.
    speeds = {label: [] for label, _ in measurements}
    for _ in range(args.repeats):
        for label, measure in measurements:
            speeds[label].append(measure())
    rows = [(label, sorted(values)[len(values) // 2], values) for label, values in speeds.items()]

    flops = child("arithmetic", args)
    nominal, cores, ghz = nominal_gflops()
    train_flops = 3 * flops["forward_flops_per_image"]
    print(f"\nforward {flops['forward_flops_per_image'] / 1e9:.3f} GFLOP per 32x32 image, training step "
          f"{train_flops / 1e9:.2f} GFLOP per image; float32 matmul here {flops['matmul_gflops']:.0f} GFLOP/s; "
          f"nominal {nominal:.0f} GFLOP/s ({cores} cores x {ghz:.2f} GHz x 32)")
    print(f"{'what':48s} {'images/s':>9s} {'x baseline':>10s} {'GFLOP/s':>8s} {'of matmul':>10s} {'of nominal':>11s}"
          "  rounds")
    results = []
    for label, speed, values in rows:
        achieved = speed * train_flops / 1e9
        results.append({"what": label, "images_per_second": speed, "rounds": values,
                        "vs_baseline": round(speed / rows[0][1], 2), "gflops": round(achieved, 1)})
        print(f"{label:48s} {speed:9.1f} {speed / rows[0][1]:10.2f} {achieved:8.1f} "
              f"{achieved / flops['matmul_gflops']:10.0%} {achieved / nominal:11.0%}  {values}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"arithmetic": {**flops, "nominal_gflops": round(nominal, 1), "cores": cores, "ghz": round(ghz, 2)},
                   "rows": results}, handle, indent=1)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
