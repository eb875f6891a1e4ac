"""Ray Tune's cost and one real search, in one run.

    python benchmarks/tune_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz
    python benchmarks/tune_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz --real

1. Overhead: the same training run (configs/search-smoke.yaml's recipe on a class-balanced
   subset) once through ``jobs/train.py`` (the baseline) and once as the only trial of a search
   through ``jobs/tune.py``; whole-process wall times and their ratio.
2. The smoke search (``configs/search-smoke.yaml``, 4 trials of 3 epochs, 2 at a time, ASHA):
   wall time and trials per hour.
3. ``--real``: configs/search.yaml (the fast recipe's ResNet-18, width 64) on
   ``--real-images-per-class`` images per class for ``--real-epochs`` epochs per trial at global
   batch ``--real-batch``, with its results table: learning rate, warm-up, weight decay and label
   smoothing.

Every command runs as its own process, one after another, each with its own local Ray.
Results are printed and written to ``<work>/tune-benchmark.json``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], log: str) -> float:
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"command failed ({result.returncode}); see {log}")
    return time.perf_counter() - started


def sets(*overrides: str) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


def overhead_and_smoke(args, common: list[str], report: dict) -> None:
    # The search's data is preprocessed once here, so neither timed command below includes it.
    run([sys.executable, "jobs/preprocess.py", "--config", "configs/search-smoke.yaml", *sets(*common)],
        f"{args.work}/preprocess.log")
    one_trial = ["tune.space={train.learning_rate: {grid: [0.03]}}", "tune.num_samples=1", "tune.scheduler=fifo"]
    train_seconds = run([sys.executable, "jobs/train.py", "--config", "configs/search-smoke.yaml",
                         *sets(*common, "train.learning_rate=0.03", "run.name=overhead")], f"{args.work}/train.log")
    tune_seconds = run([sys.executable, "jobs/tune.py", "--config", "configs/search-smoke.yaml",
                        *sets(*common, *one_trial, "tune.name=overhead")], f"{args.work}/tune-one.log")
    report["overhead"] = {"train_seconds": round(train_seconds, 1), "tune_one_trial_seconds": round(tune_seconds, 1),
                          "ratio": round(tune_seconds / train_seconds, 2)}

    smoke_seconds = run([sys.executable, "jobs/tune.py", "--config", "configs/search-smoke.yaml",
                         *sets(*common, "tune.name=smoke")], f"{args.work}/tune-smoke.log")
    with open(f"{args.work}/searches/smoke/summary.json") as handle:
        smoke = json.load(handle)
    report["smoke"] = {"process_seconds": round(smoke_seconds, 1), "trials": smoke["trials"],
                       "trials_per_hour": round(smoke["trials"] * 3600 / smoke_seconds, 1),
                       "completed": smoke["completed"], "early_stopped": smoke["early-stopped"],
                       "failed": smoke["failed"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="CIFAR-10 archive or image folder")
    parser.add_argument("--work", default="/tmp/tune-benchmark")
    parser.add_argument("--images-per-class", type=int, default=40, help="subset for the overhead and smoke runs")
    parser.add_argument("--real", action="store_true", help="also run configs/search.yaml on a subset")
    parser.add_argument("--real-images-per-class", type=int, default=100)
    parser.add_argument("--real-epochs", type=int, default=2)
    parser.add_argument("--real-samples", type=int, default=8)
    parser.add_argument("--real-batch", type=int, default=64,
                        help="global batch of the real search: enough optimizer steps on a small subset "
                             "(the learning rate follows by the recipe's linear scaling rule)")
    parser.add_argument("--only-real", action="store_true", help="skip parts 1 and 2")
    args = parser.parse_args()
    args.real = args.real or args.only_real
    if not args.only_real:
        subprocess.run(["rm", "-rf", args.work])
    os.makedirs(args.work, exist_ok=True)
    common = [f"data.source={args.source}", f"data.max_images_per_class={args.images_per_class}",
              f"data.output={args.work}/data-small", f"run.storage_path={args.work}/runs",
              f"tune.storage_path={args.work}/searches"]
    report = {}

    if not args.only_real:
        overhead_and_smoke(args, common, report)
    if args.real:
        real_seconds = run([sys.executable, "jobs/tune.py", "--config", "configs/search.yaml", *sets(
            f"data.source={args.source}", f"data.max_images_per_class={args.real_images_per_class}",
            f"data.output={args.work}/data-real", f"run.storage_path={args.work}/runs",
            f"tune.storage_path={args.work}/searches", "tune.name=real", f"train.epochs={args.real_epochs}",
            f"tune.num_samples={args.real_samples}", "tune.max_concurrent_trials=2", "run.progress_seconds=120",
            f"train.global_batch_size={args.real_batch}",
            # warm-up (the recipe's 2 epochs, and the searched range) stays below the shortened budget
            f"train.warmup_epochs={args.real_epochs / 4:g}",
            f"tune.space.train.warmup_epochs={{uniform: [0.0, {args.real_epochs / 2:g}]}}")],
            f"{args.work}/tune-real.log")
        with open(f"{args.work}/searches/real/summary.json") as handle:
            real = json.load(handle)
        with open(real["results_csv"]) as handle:
            table = handle.read()
        report["real"] = {"process_seconds": round(real_seconds, 1), "summary": real, "results_csv": table}

    with open(f"{args.work}/tune-benchmark.json", "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({key: value for key, value in report.items() if key != "real"}, indent=2))
    if "real" in report:
        print(report["real"]["results_csv"])
        print(f"real search: {report['real']['process_seconds']} s; plots in {args.work}/searches/real/plots")


if __name__ == "__main__":
    main()
