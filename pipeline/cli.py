"""The ``pipeline`` command: one subcommand per stage, each a thin call into one ``run_*`` function.

    pipeline preprocess --config configs/fast.yaml --set data.source=/data/cifar-10-python.tar.gz
    pipeline train      --config configs/fast.yaml --set train.epochs=5
    pipeline tune       --config configs/search.yaml --set tune.num_samples=8
    pipeline predict    --model artifacts/runs/fast --input photos/ --output predictions.csv
    pipeline config     --config configs/fast.yaml      (print the resolved config)
    pipeline drain-on-preemption --address $RAY_HEAD_IP:6379 --cloud aws   (on spot nodes)

``jobs/*.py`` call the same functions for ``ray job submit``. Bad configuration or input prints
``error: ...`` and exits with status 2 before any work starts. Ctrl-C (SIGINT) or SIGTERM (``ray
job stop``, a scheduler's kill) unwinds like an error, says what was kept and how to go on, and
exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pipeline import InputError, PipelineError, Stopped  # (pipeline first: TF_USE_LEGACY_KERAS before TensorFlow)
from pipeline import capacity
from pipeline.config import describe, load_config, to_yaml

# Only the project's own input errors: a ValueError from deep in TensorFlow or Ray is a bug to report
# with its traceback, not something the user typed wrong.
USAGE_ERRORS = (InputError,)


def add_config_arguments(parser: argparse.ArgumentParser, recipe_required: bool = False) -> None:
    parser.add_argument("--config", required=recipe_required, metavar="RECIPE.yaml",
                        help="recipe file, e.g. configs/fast.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    preprocess = commands.add_parser("preprocess", help="source images -> Parquet shards + manifest (Ray Data)")
    add_config_arguments(preprocess)
    preprocess.add_argument("--force", action="store_true", help="rebuild even if matching shards exist")

    train = commands.add_parser("train", help="train a ResNet with Ray Train (preprocesses first if needed)")
    add_config_arguments(train)

    search = commands.add_parser("tune", help="hyperparameter search: Ray Tune over training runs (ASHA, PBT)")
    add_config_arguments(search)

    predict = commands.add_parser("predict", help="classify an image, a folder, a glob or a file list")
    add_config_arguments(predict)
    predict.add_argument("--model", help="export dir, checkpoint dir or run dir")
    predict.add_argument("--input", help="image file, directory, glob, .txt file list or s3:// prefix")
    predict.add_argument("--output", help="predictions .csv, .parquet or directory")

    serving = commands.add_parser("serve", help="serve a model over HTTP with Ray Serve (POST /predict)")
    add_config_arguments(serving)
    serving.add_argument("--model", help="export dir, checkpoint dir or run dir")

    drain = commands.add_parser(
        "drain-on-preemption", help="on a spot node: when the cloud announces a reclaim, drain the node in Ray "
        "with reason preemption and the deadline (see pipeline/preemption.py)")
    drain.add_argument("--address", required=True, help="the head's GCS address, e.g. $RAY_HEAD_IP:6379")
    drain.add_argument("--cloud", required=True, choices=["aws", "gcp"], help="whose metadata server to watch")
    drain.add_argument("--temp-dir", help="this node's `ray start --temp-dir`, where one host runs several Ray "
                       "nodes (default: the node at this host's IP)")
    drain.add_argument("--metadata-url", help="the metadata server (default: the cloud's own)")
    drain.add_argument("--poll-seconds", type=float, default=2.0, help="how often to ask (default 2)")

    show = commands.add_parser("config", help="print the resolved config (or every key with --keys)")
    add_config_arguments(show)
    show.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except USAGE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as stop:
        by = "SIGTERM" if isinstance(stop, Stopped) else "Ctrl-C (SIGINT)"
        print(f"\nstopped by {by}: {what_was_kept(args)}", file=sys.stderr, flush=True)
        return 128 + (signal.SIGTERM if isinstance(stop, Stopped) else signal.SIGINT)


def what_was_kept(args) -> str:
    """What an interrupted stage leaves behind, and how to go on from it."""
    config = getattr(args, "loaded_config", None)
    if config is None:
        return "nothing had started"
    if args.command == "train":
        from pipeline.train.run import run_name

        return (f"run '{run_name(config)}' keeps its committed checkpoints; the same command resumes it from the "
                f"latest (what was trained after it is trained again)")
    if args.command == "tune":
        from pipeline.tune.search import search_name

        return (f"search '{search_name(config)}' keeps its finished trials and checkpoints; the same command "
                f"resumes it")
    if args.command == "preprocess":
        return "nothing was committed (the manifest is written last); the same command builds again"
    if args.command == "serve":
        return "the application was removed from Ray Serve; the same command serves again"
    return ("the files classified so far are kept (outputs appear only when complete); the same command "
            "continues with the rest")


def run(args) -> int:
    if args.command == "drain-on-preemption":
        from pipeline.preemption import watch

        args.loaded_config = None
        watch(args.address, args.cloud, temp_dir=args.temp_dir, metadata_url=args.metadata_url,
              poll_seconds=args.poll_seconds)
        return 0
    config = load_config(args.config, args.overrides)
    args.loaded_config = config
    if args.command == "predict":
        # Set directly, not as --set text: a path such as "2024" or "yes" must stay a string.
        for key in ("model", "input", "output"):
            if getattr(args, key) is not None:
                setattr(config.infer, key, getattr(args, key))
    if args.command == "serve" and args.model is not None:
        config.serve.model = args.model

    if args.command == "config":
        print(describe() if args.keys else to_yaml(config), end="\n")
        return 0
    if args.command == "predict":
        from pipeline.infer import predict_image
        from pipeline.infer.inputs import is_single_image

        settings = config.infer
        if settings.output is None and is_single_image(settings.input):
            # One image and nowhere to write: classified here, without Ray, and printed.
            if not settings.model:
                raise InputError("no model given: set --model (or infer.model) to an export, checkpoint or run folder")
            print_image_prediction(predict_image(settings.model, settings.input, settings.top_k))
            return 0
    checked = check_before_ray(config, args)
    trials = capacity.local_trials(config) if args.command == "tune" else 1
    connect_and_check(config, args, num_cpus=capacity.local_cpus_for_training(config, trials)
                      if args.command in ("train", "tune") else None)
    run_stage(config, args, checked)
    return 0


def check_before_ray(config, args):
    """What a stage can refuse before Ray starts, each in a second: the config, a cluster address
    where nothing answers, the folders it writes, then its inputs. Returns what the last checks
    resolved: the inference plan, or the data source to build (None: nothing to build, or a source
    resolved once the cluster is joined)."""
    from pipeline import preflight, runtime

    if args.command == "tune":
        from pipeline.tune.search import check_search

        check_search(config)
    if args.command in ("train", "tune"):
        from pipeline.tracking import check_tracking

        check_tracking(config)
    runtime.check_address(args.address)
    preflight.check_before_ray(config, args.command)
    if args.command == "serve":
        from pipeline.serve import check_serve

        check_serve(config.serve)  # a missing or damaged model
        return None
    if args.command == "predict":
        from pipeline.infer import plan_inference

        return plan_inference(config)  # the model, the input files and the output
    # Joining a cluster is quick, and what it refuses (local paths on several nodes, its token)
    # comes first there; starting a local Ray takes 10-20 s, so a missing, empty or damaged source
    # is refused before it.
    if joins_a_cluster(args):
        return None
    from pipeline.data.preprocess import source_to_build

    return source_to_build(config, args.command, getattr(args, "force", False))


def joins_a_cluster(args) -> bool:
    return bool(args.address or os.environ.get("RAY_ADDRESS"))


def connect_and_check(config, args, num_cpus: int | None = None) -> None:
    """Start or join Ray, then the checks that depend on the cluster (shared storage, CPUs left
    for input or decoding, the driver's node): they fail here, before any work."""
    from pipeline import preflight, runtime

    runtime.connect(args.address, num_cpus=num_cpus)
    cluster = preflight.cluster_shape()
    tracking_note = preflight.settle_tracking(config, args.command, cluster)
    if tracking_note:
        print(tracking_note, flush=True)
    preflight.check(config, args.command, cluster)
    note = preflight.waiting_note(config, args.command, cluster)
    if note:
        print(note, flush=True)
    if args.command == "predict":
        from pipeline.infer.run import warn_if_no_cpu_left_for_decoding

        warn_if_no_cpu_left_for_decoding(config.infer, cluster.cpus)


def run_stage(config, args, checked) -> None:
    """The stage's one ``run_*`` function on the Ray that ``connect_and_check`` started or joined,
    and its summary. ``checked``: what ``check_before_ray`` resolved."""
    if args.command == "serve":
        from pipeline.serve import run_serve

        run_serve(config)
        return
    if args.command == "predict":
        from pipeline.infer import run_inference

        print_inference_summary(run_inference(config, checked))
        return
    from pipeline.data.preprocess import ensure_preprocessed, run_preprocess, source_to_build, summarize

    force = getattr(args, "force", False)
    source = source_to_build(config, args.command, force) if joins_a_cluster(args) else checked
    if args.command == "preprocess":
        print(summarize(run_preprocess(config, force=force, source=source)))
        return
    if source is not None:
        ensure_preprocessed(config, source)  # built once here; the stage then finds it current
    if args.command == "train":
        from pipeline.train.run import run_training

        print_training_summary(run_training(config))
    else:
        from pipeline.tune.search import run_search

        print_search_summary(run_search(config))


def print_training_summary(summary: dict) -> None:
    evaluation = summary["evaluation"]
    final = summary["final"]
    print(f"\nrun '{summary['run']}' finished: {summary['epochs']} epochs in {summary['wall_seconds']:.0f} s, "
          f"{summary['train_images_per_second']} train images/s")
    if "val_accuracy" in final:
        print(f"  last epoch: val top-1 {final['val_accuracy']:.4f}, val top-5 {final.get('val_top5_accuracy', 0):.4f}; "
              f"best val top-1 {summary['best_val_accuracy']:.4f}")
    if "accuracy" in evaluation:
        print(f"  {evaluation['split']} ({evaluation['rows']} images): top-1 {evaluation['accuracy']:.4f}, "
              f"top-5 {evaluation['top5_accuracy']:.4f}, loss {evaluation['loss']:.4f}")
    if len(summary.get("attempts", [])) > 1:  # restarts (failures, preemptions) and elastic resizes
        print("  attempts: " + "; ".join(
            f"{attempt['workers']} worker(s) from epoch {attempt['from_epoch'] + 1}"
            + (f" step {attempt['from_step']}" if attempt["from_step"] else "")
            + f", finished epochs {attempt['epochs'] or 'none'}" for attempt in summary["attempts"]))
    print(f"  model: {summary['export']}\n  summary: {summary['run_dir']}/summary.json")
    print_tracking(summary.get("tracking"))


def print_tracking(tracked) -> None:
    """Where the run is in MLflow, and what could not be logged there."""
    if not tracked:
        return
    if tracked.get("run_id") not in (None, "none"):
        version = (f"; model {tracked['registered_model']} version {tracked['model_version']}"
                   if tracked.get("model_version") else "")
        print(f"  MLflow: run {tracked['run_id']} in experiment {tracked.get('experiment')}{version}; "
              f"see it: {tracked.get('ui')}")
    skipped = tracked.get("not_logged")
    if skipped:
        what = ", ".join(skipped["not_logged"][:6]) + (", ..." if len(skipped["not_logged"]) > 6 else "")
        print(f"  not logged to MLflow at {skipped['store']} ({skipped['reason']}): {what}")


def print_search_summary(summary: dict) -> None:
    print(f"\nsearch '{summary['search']}' finished: {summary['trials']} trials ({summary['completed']} completed, "
          f"{summary['early-stopped']} early-stopped, {summary['failed']} failed) in {summary['wall_seconds']:.0f} s")
    best = summary["best"]
    if best is None:
        print("  no trial reported a result")
        return
    values = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in best["params"].items())
    print(f"  best trial {best['trial']}: {values}; best {summary['metric']} {best[summary['metric']]:.4f}")
    if best["export"]:
        print(f"  model: {best['export']}")
    print(f"  results: {summary['results_csv']}\n  train it: python jobs/train.py --config {summary['best_yaml']}")
    print_tracking(summary.get("tracking"))


def print_inference_summary(summary: dict) -> None:
    failed = summary["failed"]
    print(f"\n{summary['files_seen']:,} files: {summary['classified']:,} classified, {failed:,} failed"
          f"{' (see ' + summary['outputs']['errors'] + ')' if failed else ''}, "
          f"{summary['elapsed_seconds']:.1f} s, {summary['images_per_second']:.1f} images/s end to end")
    accuracy = summary["accuracy"]
    if accuracy is not None and accuracy["images"]:
        print(f"  accuracy over {accuracy['images']:,} labelled images: top-1 {accuracy['top1']:.4f}, "
              f"top-5 {accuracy['top5']:.4f}")
        worst = sorted((values["accuracy"], name) for name, values in accuracy["per_class"].items()
                       if values["accuracy"] is not None)[:3]
        print("  lowest per-class accuracy: " + ", ".join(f"{name} {value:.4f}" for value, name in worst))
    for name, path in summary["outputs"].items():
        print(f"  {name}: {path}")


def print_image_prediction(result: dict) -> None:
    print(f"{result['predicted_class']}  (confidence {result['confidence']:.4f})  {result['path']}")
    for rank, (name, probability) in enumerate(zip(result["top_k_classes"], result["top_k_probabilities"]), 1):
        print(f"  {rank}. {name:<20} {probability:.4f}")


if __name__ == "__main__":
    sys.exit(main())
