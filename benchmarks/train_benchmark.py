"""Training speed and first-epoch accuracy, against the original recipe, in one run.

    python benchmarks/train_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz            # speed
    python benchmarks/train_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz --full-epoch

Speed: the original tutorial's plain Keras script (benchmarks/seed_keras_baseline.py, batch 100,
float32, in-memory arrays) is the baseline; then ``jobs/train.py`` with the seed recipe at fp32
and bf16 on 1 and 2 Ray Train workers, and the fast recipe, each for 2 epochs on a class-balanced
subset (``data.max_images_per_class``); the figure is the second epoch's steady-state training
images/s (``steady_images_per_second`` in history.json: from the end of the epoch's first step to
the end of its last, so neither graph tracing nor the input pipeline's start-up is counted; the
baseline script times its steps the same way). Every command runs as its own process, one after another.

--full-epoch: one full epoch on all 45,000 training images of the fast recipe (its one-cycle
schedule compressed into that epoch) and of the seed recipe, with the validation accuracy each
reaches. Results are printed as a table and written as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], log: str, env: dict | None = None) -> float:
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    if result.returncode:
        raise SystemExit(f"command failed ({result.returncode}); see {log}")
    return time.perf_counter() - started


def train(args, name: str, recipe: str, *overrides: str) -> dict:
    run_dir = os.path.join(args.work, "runs", name)
    subprocess.run(["rm", "-rf", run_dir])
    command = [sys.executable, "jobs/train.py", "--config", f"configs/{recipe}.yaml",
               "--set", f"data.source={args.source}", "--set", f"run.storage_path={args.work}/runs",
               "--set", f"run.name={name}", *[part for o in overrides for part in ("--set", o)]]
    seconds = run(command, os.path.join(args.work, f"{name}.log"))
    with open(os.path.join(run_dir, "history.json")) as handle:
        history = json.load(handle)
    return {"name": name, "command": " ".join(command[1:]), "process_seconds": round(seconds, 1), "history": history}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="CIFAR-10 archive or image folder")
    parser.add_argument("--work", default="/tmp/train-benchmark")
    parser.add_argument("--images-per-class", type=int, default=600, help="subset for the speed runs")
    parser.add_argument("--bf16-images-per-class", type=int, default=None,
                        help="smaller subset for the bf16 runs (slow on CPUs without bf16 units); default: same")
    parser.add_argument("--baseline-images", type=int, default=3000, help="images the baseline script trains on")
    parser.add_argument("--full-epoch", action="store_true")
    parser.add_argument("--recipes", default="fast,seed", help="--full-epoch: which recipes, in order")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count()}, "runs": []}

    if not args.full_epoch:
        # The baseline as the tutorial's user runs it (TensorFlow's defaults: oneDNN kernels are on
        # only on Intel CPUs with AVX-512 VNNI/bf16/AMX), and with oneDNN forced on as the pipeline does.
        baselines = {}
        for label, env in (("defaults", {}), ("onednn", {"TF_ENABLE_ONEDNN_OPTS": "1"})):
            baseline_log = os.path.join(args.work, f"baseline-{label}.log")
            run([sys.executable, "benchmarks/seed_keras_baseline.py", "--images", str(args.baseline_images)],
                baseline_log, env)
            baselines[label] = json.loads(open(baseline_log).read().strip().splitlines()[-1])
        results["baseline"] = baseline = baselines["defaults"]
        results["baseline_onednn"] = baselines["onednn"]
        rows = [("original Keras script (fp32, batch 100, 1 process)", baseline["images_per_second"]),
                ("  same, TF_ENABLE_ONEDNN_OPTS=1", baselines["onednn"]["images_per_second"])]
        for precision in ("fp32", "bf16"):
            per_class = args.images_per_class if precision == "fp32" else (args.bf16_images_per_class or
                                                                            args.images_per_class)
            subset = [f"data.max_images_per_class={per_class}", f"data.output={args.work}/data-subset-{per_class}",
                      "train.epochs=2"]
            for workers in (1, 2):
                outcome = train(args, f"seed-{precision}-{workers}w", "seed", *subset,
                                f"train.precision={precision}", f"scaling.num_workers={workers}")
                results["runs"].append(outcome)
                rows.append((f"pipeline seed recipe, {precision}, {workers} worker(s), batch 100, {per_class}/class",
                             outcome["history"][-1]["steady_images_per_second"]))
        subset = [f"data.max_images_per_class={args.images_per_class}",
                  f"data.output={args.work}/data-subset-{args.images_per_class}", "train.epochs=2"]
        outcome = train(args, "fast-1w", "fast", *subset, "train.warmup_epochs=0.5")
        results["runs"].append(outcome)
        precision = outcome["history"][-1].get("precision", "auto")
        rows.append((f"pipeline fast recipe, {precision}, 1 worker, batch 256",
                     outcome["history"][-1]["steady_images_per_second"]))
        print(f"\n{'configuration':60s} {'train images/s':>15s} {'x baseline':>11s}")
        for label, speed in rows:
            print(f"{label:60s} {speed:15.1f} {speed / baseline['images_per_second']:11.2f}")
    else:
        rows = []
        extras = {"fast": ["train.warmup_epochs=0.3"], "seed": []}
        for recipe in args.recipes.split(","):
            name, extra = f"{recipe}-1-epoch", extras.get(recipe, [])
            # Each recipe its own shards: the seed's Keras-style tail split differs from the fast one's.
            outcome = train(args, name, recipe, f"data.output={args.work}/data-full-{recipe}", "train.epochs=1",
                            *extra)
            results["runs"].append(outcome)
            epoch = outcome["history"][0]
            rows.append((name, epoch["val_accuracy"], epoch["epoch_seconds"], epoch["images_per_second"]))
        print(f"\n{'run':16s} {'val top-1':>10s} {'epoch s':>9s} {'train images/s':>15s}")
        for name, accuracy, seconds, speed in rows:
            print(f"{name:16s} {accuracy:10.4f} {seconds:9.1f} {speed:15.1f}")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
