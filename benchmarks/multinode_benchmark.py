"""Two Ray Train workers on one node against the same two workers on two nodes, same run.

    python benchmarks/multinode_benchmark.py --source ../shared/data/cifar10-jpeg-train.tar.gz

Both clusters run on this machine (`ray start`, token-authenticated, each node with its own temp
dir), so the second puts the gradient all-reduce between two raylets over loopback TCP instead of
inside one; the cores are the same two either way, so the ratio isolates what crossing nodes
costs the pipeline (worker placement, gRPC collectives, Ray Data shards streamed to another
node), not what a second machine would add. Each node has one "slot" resource and every worker
asks for one, so the workers land one per node (or both on the single node, which has two).
The figure is the second epoch's steady-state training images/s (history.json).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from ray_nodes import cluster_env, head_node, submit, worker_node  # noqa: E402


def train(cluster: dict, args, name: str) -> dict:
    command = ["python", os.path.join(REPO, "jobs/train.py"), "--config", os.path.join(REPO, "configs/fast.yaml"),
               "--set", f"data.source={args.source}", "--set", f"data.max_images_per_class={args.images_per_class}",
               "--set", f"data.output={args.work}/data", "--set", f"run.storage_path={args.work}/runs",
               "--set", f"run.name={name}", "--set", f"run.shared_paths=[{args.work}]",
               "--set", "train.epochs=2", "--set", "train.precision=fp32", "--set", "train.max_failures=0",
               "--set", "train.global_batch_size=64", "--set", "train.warmup_epochs=0.5",
               "--set", "scaling.num_workers=2", "--set", "scaling.cpus_per_worker=0.5",
               "--set", "scaling.custom_resources={slot: 1}"]
    result = submit(cluster["address"], cluster["env"], None, *command)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    run_dir = os.path.join(args.work, "runs", name)
    history = json.load(open(os.path.join(run_dir, "history.json")))
    workers = json.load(open(os.path.join(run_dir, "summary.json")))["workers"]
    return {"steady_images_per_second": history[-1]["steady_images_per_second"],
            "nodes": len({worker["node_id"] for worker in workers})}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--work", default="/tmp/multinode-benchmark")
    parser.add_argument("--images-per-class", type=int, default=60)
    args = parser.parse_args()
    args.source = os.path.abspath(args.source)
    subprocess.run(["rm", "-rf", args.work])
    os.makedirs(args.work)
    # Preprocessed once, outside both clusters, so neither timed run includes it.
    subprocess.run([sys.executable, os.path.join(REPO, "jobs/preprocess.py"), "--config",
                    os.path.join(REPO, "configs/fast.yaml"), "--set", f"data.source={args.source}",
                    "--set", f"data.max_images_per_class={args.images_per_class}",
                    "--set", f"data.output={args.work}/data"], check=True, stdout=subprocess.DEVNULL)
    env = cluster_env()
    results = {}
    with head_node(tempfile.mkdtemp(prefix="ray-b1-"), env, num_cpus=2, extra=("--resources={\"slot\": 2}",)) as one:
        results["one node"] = train(one, args, "one-node")
    with head_node(tempfile.mkdtemp(prefix="ray-b2-"), env, num_cpus=1, extra=("--resources={\"slot\": 1}",)) as head:
        with worker_node(head["gcs"], env, num_cpus=1, expected_nodes=2, temp_dir=tempfile.mkdtemp(prefix="ray-b3-"),
                         extra=("--resources={\"slot\": 1}",)):
            results["two nodes"] = train(head, args, "two-nodes")
    base = results["one node"]["steady_images_per_second"]
    for name, result in results.items():
        print(f"{name}: {result['steady_images_per_second']} images/s on {result['nodes']} node(s), "
              f"{result['steady_images_per_second'] / base:.2f}x")
    json.dump(results, open(os.path.join(args.work, "multinode-benchmark.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
