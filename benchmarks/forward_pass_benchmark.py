"""Per-batch time of the inference forward pass: tf-keras' ``predict_on_batch`` against
``pipeline.models.saving.predict_function``, in a plain process and beside a running Ray.

    python benchmarks/forward_pass_benchmark.py
    python benchmarks/forward_pass_benchmark.py --rounds 3 --batches 12 --json-out /tmp/forward_pass.json

Each measurement is a process of its own (the speed of a TensorFlow process can differ from the
next one's): an untrained ResNet-18 (``ModelConfig`` defaults, 32x32) exported and loaded back as a
model actor loads it, then ``--batches`` calls on one batch of 256 random images, each timed with
the process's CPU time over it ("cores": CPU seconds per second; 2.0 is both vCPUs busy). With
``--with-ray`` the process first starts a local Ray (``pipeline.runtime.connect``), as a model actor
lives beside one. The four kinds of process run in turn, ``--rounds`` times (interleaved, so that a
slow spell of the machine falls on all of them). A batch counts as slow when it takes at least 1.8x
the fastest batch of the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))

KINDS = [("predict_on_batch", False), ("predict_function", False), ("predict_on_batch", True),
         ("predict_function", True)]


def measure(model_dir: str, function: str, with_ray: bool, batches: int) -> dict:
    """Runs in its own process."""
    import numpy as np

    import pipeline  # noqa: F401
    from pipeline.models.saving import load_model, predict_function

    if with_ray:
        from pipeline import runtime

        runtime.connect(num_cpus=3)
    model, _ = load_model(model_dir)
    images = np.random.default_rng(0).uniform(0, 255, (256, 32, 32, 3)).astype(np.float32)
    if function == "predict_function":
        compiled = predict_function(model)

        def call():
            return compiled(images).numpy()
    else:
        def call():
            return model.predict_on_batch(images)
    call()  # trace and build first
    seconds, cores = [], []
    for _ in range(batches):
        cpu, started = time.process_time(), time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        seconds.append(round(elapsed, 3))
        cores.append(round((time.process_time() - cpu) / elapsed, 2))
    return {"function": function, "with_ray": with_ray, "seconds": seconds, "cores": cores}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=12, help="timed batches of 256 per process")
    parser.add_argument("--json-out")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL_DIR", "FUNCTION", "WITH_RAY"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.measure:
        model_dir, function, with_ray = arguments.measure
        print("RESULT " + json.dumps(measure(model_dir, function, with_ray == "ray", arguments.batches)))
        return {}

    import infer_benchmark

    runs = []
    with tempfile.TemporaryDirectory(prefix="forward-pass-") as scratch:
        model_dir = infer_benchmark.export_untrained_resnet18(os.path.join(scratch, "model"))
        for round_index in range(arguments.rounds):
            for function, with_ray in KINDS:
                print(f"[benchmark] round {round_index + 1}/{arguments.rounds}: {function}"
                      f"{' beside Ray' if with_ray else ''}", flush=True)
                completed = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--batches", str(arguments.batches), "--measure",
                     model_dir, function, "ray" if with_ray else "plain"],
                    capture_output=True, text=True)
                lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
                if completed.returncode != 0 or not lines:
                    raise RuntimeError(f"measurement failed:\n{completed.stderr[-3000:]}")
                runs.append(json.loads(lines[-1][len("RESULT "):]))
    fastest = min(second for run in runs for second in run["seconds"])
    summary = []
    print(f"\n[benchmark] batches of 256; slow: >= 1.8 x the fastest batch ({fastest:.2f} s)")
    print(f"  {'function':<18} {'beside Ray':<11} {'slow batches':>13} {'median s':>9} {'images/s':>9}"
          f" {'cores, fast / slow batches':>27}")
    for function, with_ray in KINDS:
        mine = [run for run in runs if run["function"] == function and run["with_ray"] == with_ray]
        pairs = [(second, core) for run in mine for second, core in zip(run["seconds"], run["cores"])]
        slow = [pair for pair in pairs if pair[0] >= 1.8 * fastest]
        fast = [pair for pair in pairs if pair[0] < 1.8 * fastest]
        median = sorted(second for second, _ in pairs)[len(pairs) // 2]
        total = sum(second for second, _ in pairs)

        def mean_cores(group):
            return f"{sum(core for _, core in group) / len(group):.2f}" if group else "-"

        row = {"function": function, "with_ray": with_ray, "batches": len(pairs), "slow_batches": len(slow),
               "slow_per_process": [sum(second >= 1.8 * fastest for second in run["seconds"]) for run in mine],
               "median_seconds": median, "images_per_second": round(256 * len(pairs) / total, 1),
               "cores_fast": mean_cores(fast), "cores_slow": mean_cores(slow)}
        summary.append(row)
        print(f"  {function:<18} {'yes' if with_ray else 'no':<11} {len(slow):>6} of {len(pairs):<5}"
              f" {median:>9.2f} {row['images_per_second']:>9.1f} {row['cores_fast']:>14} / {row['cores_slow']}")
    results = {"benchmark": "forward_pass", "fastest_batch_seconds": fastest, "summary": summary, "runs": runs}
    if arguments.json_out:
        with open(arguments.json_out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"  results: {arguments.json_out}")
    return results


if __name__ == "__main__":
    main()
