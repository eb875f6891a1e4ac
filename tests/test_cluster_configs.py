"""The deployment assets are valid and say what the product needs, checked offline.

ray-cluster.yaml (AWS) and cluster/gcp.yaml go through the JSON schema shipped in the Ray wheel and
through Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs before it touches a
cloud); the KubeRay manifests, cluster/Dockerfile and cluster/runtime-env.yaml are parsed and checked
field by field. No cloud call, no Ray cluster: a fixture makes any network connection fail the test.

Each check is a function returning a list of problems, so every test can also show that the check
fails on a broken copy of the file.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import socket
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import ray.autoscaler
# Private API, the functions `ray up` calls (ray/autoscaler/_private/util.py). prepare_config fills
# the provider's defaults from <provider>/defaults.yaml in the wheel: it reads files only and imports
# neither boto3 nor the Google client, so nothing needs mocking (the no_network fixture proves it).
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.cli import build_parser
from pipeline.runtime import WORKER_ENV_VARS
from pipeline.tune.search import HEAD_RESOURCE

import conftest
from infer_files import export_served_model

REPO = Path(conftest.REPO)
LAUNCHER_CONFIGS = {"aws": REPO / "ray-cluster.yaml", "gcp": REPO / "cluster" / "gcp.yaml"}
KUBERAY_MANIFESTS = {"raycluster": REPO / "cluster" / "kuberay" / "raycluster.yaml",
                     "rayjob": REPO / "cluster" / "kuberay" / "rayjob.yaml",
                     "rayservice": REPO / "cluster" / "kuberay" / "rayservice.yaml"}
SERVE_CONFIG = REPO / "cluster" / "serve.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
RUNTIME_ENV = REPO / "cluster" / "runtime-env.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
TOKEN_FILE = "~/.ray/auth_token"  # what `ray get-auth-token --generate` writes on your machine
PROJECT_MOUNT = "~/ray-image-pipeline"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access in an offline test: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: Path):
    return yaml.safe_load(path.read_text())


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    requirements = (Requirement(line) for line in pyproject()["project"]["dependencies"])
    return {canonicalize_name(req.name): req for req in requirements}


# ------------------------------------------------------------------ versions (shared by all files)

def pip_requirements(text: str) -> dict[str, Requirement]:
    """Requirements named on the `pip install` command lines of a Dockerfile or a list of shell
    commands (continuation lines joined, comment lines skipped, options and local paths ignored)."""
    found = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#") or "pip install" not in line:
            continue
        words = shlex.split(line.split("pip install", 1)[1], comments=True)
        for word in words:
            if word.startswith("-") or word.startswith((".", "/", "~")) or word in ("&&", ";"):
                continue
            requirement = Requirement(word)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def pinned_minor(requirement: Requirement) -> str | None:
    """'2.21' for `==2.21.*`, the only pin form that follows TensorFlow's patch releases."""
    specs = list(requirement.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and specs[0].version.endswith(".*"):
        return specs[0].version[: -len(".*")]
    return None


def pin_problems(text: str) -> list[str]:
    """TensorFlow / tf-keras pins and the rayproject/ray base image in `text`, against pyproject.toml:
    both pinned to the same minor version, every patch of it inside pyproject's range, and the image's
    Ray and Python versions inside pyproject's ray range and requires-python."""
    problems = []
    allowed = pyproject_requirements()
    pins = pip_requirements(text)
    minors = {}
    for name in ("tensorflow", "tf-keras"):
        if name not in pins:
            problems.append(f"{name} is not installed")
            continue
        minor = pinned_minor(pins[name])
        if minor is None:
            problems.append(f"{pins[name]} is not pinned as ==X.Y.*")
            continue
        minors[name] = minor
        for patch in (f"{minor}.0", f"{minor}.999"):
            if Version(patch) not in allowed[name].specifier:
                problems.append(f"{name} {patch} is outside pyproject's {allowed[name].specifier}")
    if len(set(minors.values())) > 1:
        problems.append(f"tensorflow and tf-keras pin different minor versions: {minors}")

    images = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", text))
    if len(images) != 1:
        problems.append(f"expected one rayproject/ray:<version>-py<XY> image, found {sorted(images)}")
    for ray_version, major, minor in images:
        if Version(ray_version) not in allowed["ray"].specifier:
            problems.append(f"ray {ray_version} is outside pyproject's {allowed['ray'].specifier}")
        python = Version(f"{major}.{minor}")
        if python not in SpecifierSet(pyproject()["project"]["requires-python"]):
            problems.append(f"python {python} is outside requires-python")
    return problems


def image_ray_version(text: str) -> str:
    return re.search(r"rayproject/ray:(\d+\.\d+\.\d+)-py", text).group(1)


# ------------------------------------------------------------------ cluster launcher configs

def launcher_config_errors(raw: dict) -> None:
    """Raise what `ray up` would raise before contacting the cloud."""
    jsonschema.validate(raw, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(raw)))


def docker_env(config: dict) -> dict[str, str]:
    words = shlex.split(" ".join(config.get("docker", {}).get("run_options", [])))
    env = {}
    for flag, value in zip(words, words[1:]):
        if flag in ("--env", "-e"):
            key, _, val = value.partition("=")
            env[key] = val
    return env


def gpu_types(config: dict) -> dict[str, dict]:
    return {name: node for name, node in config["available_node_types"].items()
            if node["resources"].get("GPU", 0) > 0}


def product_problems(raw: dict) -> list[str]:
    """What this project needs from a cluster launcher config, beyond Ray's own checks."""
    problems = []
    config = prepare_config(copy.deepcopy(raw))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append(f"head resources {head['resources']}: training work could land on the head")
    if not head["resources"].get(HEAD_RESOURCE, 0) >= 1:
        problems.append(f"the head does not advertise {HEAD_RESOURCE}: Tune trial drivers could land on spot nodes")
    gpus = gpu_types(config)
    if not any(node["resources"]["GPU"] == 1 for node in gpus.values()):
        problems.append("no 1-GPU worker type")
    if not any(node["resources"]["GPU"] > 1 for node in gpus.values()):
        problems.append("no multi-GPU worker type")
    for name, node in gpus.items():
        if node["min_workers"] != 0 or not node["max_workers"] > 0:
            problems.append(f"{name}: min_workers {node['min_workers']}, max_workers {node['max_workers']}"
                            " (GPU nodes must start at zero and be able to scale)")
        # Ray's docker runner adds --runtime=nvidia only when `docker info` lists
        # nvidia-container-runtime: the GPUs are asked for explicitly.
        options = [*config.get("docker", {}).get("run_options", []),
                   *node.get("docker", {}).get("worker_run_options", [])]
        if not any(option.split() == ["--gpus", "all"] or option == "--gpus=all" for option in options):
            problems.append(f"{name}: its containers do not ask for the GPUs (--gpus all)")
    if sum(node["min_workers"] for node in types.values()) > config["max_workers"]:
        problems.append("sum of min_workers exceeds max_workers")

    # Token authentication: the variables reach every Ray process through `docker run`, and the
    # token file they point at is mounted from your machine.
    if not config.get("docker", {}).get("image"):
        problems.append("no docker image: run_options would not reach the Ray processes")
    env = docker_env(config)
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("RAY_AUTH_MODE=token is not passed to the containers")
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if not token_path or config["file_mounts"].get(token_path) != TOKEN_FILE:
        problems.append(f"RAY_AUTH_TOKEN_PATH={token_path} is not a mount of {TOKEN_FILE}")

    commands = "\n".join(config["setup_commands"])
    problems += pin_problems(commands + "\n" + config.get("docker", {}).get("image", ""))
    tensorflow = pip_requirements(commands).get("tensorflow")
    if tensorflow is not None and "and-cuda" not in tensorflow.extras:
        problems.append("tensorflow is installed without its CUDA libraries ([and-cuda])")
    if config["file_mounts"].get(PROJECT_MOUNT) != ".":
        problems.append(f"the checkout is not mounted at {PROJECT_MOUNT}")
    if not re.search(rf"pip install .*-e {re.escape(PROJECT_MOUNT)}\b", commands):
        problems.append("the project is not installed on the nodes")

    head_start, worker_start = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    if head_start[:1] != ["ray stop"] or worker_start[:1] != ["ray stop"]:
        problems.append("start commands must stop a previous Ray first")
    for flag in ("--head", "--autoscaling-config=~/ray_bootstrap_config.yaml", "--dashboard-host=0.0.0.0"):
        if not any(flag in command for command in head_start):
            problems.append(f"head start command lacks {flag}")
    if not any("--address=$RAY_HEAD_IP:6379" in command for command in worker_start):
        problems.append("worker start command does not join the head")
    # The preemption watcher, started after Ray on every worker, with a command line our CLI takes.
    cloud = {"aws": "aws", "gcp": "gcp"}[config["provider"]["type"]]
    watchers = [shlex.split(part.split("nohup", 1)[1].split(">", 1)[0]) for part in worker_start
                if "nohup pipeline drain-on-preemption" in part]
    if not watchers:
        problems.append("worker nodes do not run `pipeline drain-on-preemption`")
    for words in watchers:
        args = build_parser().parse_args(words[1:])
        if (args.address, args.cloud) != ("$RAY_HEAD_IP:6379", cloud):
            problems.append(f"the preemption watcher watches {args.cloud} for {args.address}")
    return problems


@pytest.mark.parametrize("cloud", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema_and_checks(cloud):
    launcher_config_errors(load(LAUNCHER_CONFIGS[cloud]))


@pytest.mark.parametrize("cloud", LAUNCHER_CONFIGS)
def test_launcher_config_has_what_the_product_needs(cloud):
    assert product_problems(load(LAUNCHER_CONFIGS[cloud])) == []


def _set(raw: dict, path: str, value) -> dict:
    broken = copy.deepcopy(raw)
    *parents, last = path.split("/")
    node = broken
    for key in parents:
        node = node[key]
    node[last] = value
    return broken


@pytest.mark.parametrize("cloud", LAUNCHER_CONFIGS)
def test_broken_launcher_configs_are_rejected(cloud):
    raw = load(LAUNCHER_CONFIGS[cloud])
    one_gpu = next(name for name, node in gpu_types(raw).items() if node["resources"] == {"CPU": 8, "GPU": 1})
    head = raw["head_node_type"]
    # Ray's schema and checks: a typo'd top-level key, a fractional GPU, a head type that does not
    # exist, more minimum workers than the cluster allows.
    for broken in (
        {**raw, "max_worker": 8},
        _set(raw, f"available_node_types/{one_gpu}/resources", {"CPU": 8, "GPU": 0.5}),
        {**raw, "head_node_type": "no-such-type"},
        _set(raw, f"available_node_types/{one_gpu}/min_workers", raw["max_workers"] + 1),
    ):
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            launcher_config_errors(broken)
    # This project's needs, each broken on its own.
    for path, value, expected in (
        (f"available_node_types/{head}/resources", {"CPU": 4}, "training work could land on the head"),
        (f"available_node_types/{one_gpu}/min_workers", 1, "must start at zero"),
        ("docker/run_options", [], "RAY_AUTH_MODE=token is not passed"),
        (f"available_node_types/{one_gpu}/docker", {}, "do not ask for the GPUs (--gpus all)"),
        ("file_mounts", {PROJECT_MOUNT: "."}, "is not a mount of"),
        ("setup_commands", ['pip install "tensorflow==2.21.*" "tf-keras==2.20.*"',
                            f"pip install -e {PROJECT_MOUNT}"], "different minor versions"),
        ("worker_start_ray_commands", ["ray stop", "ray start --head"], "does not join the head"),
        ("worker_start_ray_commands", ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
         "do not run `pipeline drain-on-preemption`"),
        (f"available_node_types/{head}/resources", {"CPU": 0}, "does not advertise trial_driver"),
    ):
        assert any(expected in problem for problem in product_problems(_set(raw, path, value))), path


@pytest.mark.parametrize("cloud", LAUNCHER_CONFIGS)
def test_workers_get_credentials_for_cloud_storage(cloud):
    # Ray's bootstrap gives its IAM role / service account to the head only; the workers read shards
    # and write checkpoints to s3:// or gs:// themselves.
    raw = load(LAUNCHER_CONFIGS[cloud])
    for name, node in gpu_types(raw).items():
        if cloud == "aws":
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}, name
        else:
            (account,) = node["node_config"]["serviceAccounts"]
            project = raw["provider"]["project_id"]
            assert account["email"] == f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com", name


@pytest.mark.parametrize("cloud", LAUNCHER_CONFIGS)
def test_spot_variant_is_a_spot_machine_that_starts_at_zero(cloud):
    raw = load(LAUNCHER_CONFIGS[cloud])
    (spot,) = [node for node in gpu_types(raw).values() if "spot" in node["resources"]]
    market = (spot["node_config"].get("InstanceMarketOptions", {}).get("MarketType") if cloud == "aws"
              else spot["node_config"]["scheduling"]["provisioningModel"])
    assert market.lower() == "spot"
    assert spot["min_workers"] == 0


@pytest.mark.parametrize("cloud", LAUNCHER_CONFIGS)
def test_autoscaler_adds_the_intended_node_types(cloud):
    """What scales: the node types Ray's own scheduler function (private API, the one the autoscaler
    calls) picks for this project's requests."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    config = prepare_config(load(LAUNCHER_CONFIGS[cloud]))
    types, head = config["available_node_types"], config["head_node_type"]
    by_role = {("spot" if "spot" in node["resources"] else f"{node['resources']['GPU']}x"): name
               for name, node in gpu_types(config).items()}
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))

    def nodes_for(requests, running=None):
        existing = {head: 1, **{by_role[role]: count for role, count in (running or {}).items()}}
        return dict(get_nodes_for(types, existing, head, 100, requests, scorer)[0])

    train_worker = {"CPU": 1, "GPU": 1}
    assert nodes_for([train_worker] * 2) == {by_role["1x"]: 2}  # one 1-GPU node per Train worker
    assert nodes_for([{"CPU": 4, "GPU": 4}]) == {by_role["4x"]: 1}
    assert nodes_for([{"CPU": 1}] * 16) == {by_role["1x"]: 2}  # preprocess tasks: never the head
    assert nodes_for([{"CPU": 1}]) == {by_role["1x"]: 1}  # a default Tune trial driver, a moved job driver
    assert nodes_for([train_worker], running={"1x": 4}) == {by_role["4x"]: 1}
    assert nodes_for([train_worker], running={"1x": 4, "4x": 2}) == {by_role["spot"]: 1}
    assert nodes_for([{"CPU": 1, "GPU": 1, "spot": 1}]) == {by_role["spot"]: 1}


def test_launcher_mounts_exist_in_the_checkout():
    # `ray up` runs from the repository root and fails on a missing local path.
    for path in LAUNCHER_CONFIGS.values():
        for remote, local in load(path)["file_mounts"].items():
            if local != TOKEN_FILE:
                assert (REPO / local).exists(), (path.name, remote, local)


# ------------------------------------------------------------------ Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_image_name(text: str) -> str:
    """The name the Dockerfile's own build command gives the image."""
    (name,) = set(re.findall(r"docker build -f cluster/Dockerfile -t (\S+)", text))
    return name


def test_dockerfile_installs_versions_pyproject_allows():
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions(text)
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("rayproject/ray:")
    assert pin_problems("\n".join(f"{k} {v}" for k, v in instructions)) == []
    assert "and-cuda" in pip_requirements(text)["tensorflow"].extras


def test_dockerfile_sets_the_worker_environment_and_installs_the_project():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    env = dict(word.split("=", 1) for key, value in instructions if key == "ENV" for word in shlex.split(value))
    assert env.items() >= WORKER_ENV_VARS.items()
    copied = " ".join(value for key, value in instructions if key == "COPY")
    for needed in ("pyproject.toml", "README.md", "pipeline/", "jobs/", "configs/"):
        assert needed in copied
    assert ("RUN", 'pip install --no-cache-dir ".[serve]"') in instructions  # serve: the RayService's app
    # The tag is the project's version, so an image always says which code it holds.
    assert dockerfile_image_name(DOCKERFILE.read_text()).endswith(":" + pyproject()["project"]["version"])


@pytest.mark.parametrize("change, expected", [
    (('"tf-keras==2.21.*"', '"tf-keras==2.20.*"'), "different minor versions"),
    (("tensorflow[and-cuda]==2.21.*", "tensorflow[and-cuda]==2.22.*"), "outside pyproject"),
    (("tensorflow[and-cuda]==2.21.*", "tensorflow[and-cuda]>=2.16"), "not pinned"),
    (('"tf-keras==2.21.*"', ""), "tf-keras is not installed"),
    (("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.49.0-py311-gpu"), "ray 2.49.0 is outside"),
    (("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py39-gpu"), "requires-python"),
])
def test_version_check_fails_on_a_modified_dockerfile(change, expected):
    old, new = change
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(expected in problem for problem in pin_problems(text.replace(old, new)))


# ------------------------------------------------------------------ KubeRay manifests

def auth_problems(env: list[dict], where: str) -> tuple[list[str], set]:
    by_name = {item["name"]: item for item in env or []}
    problems, secrets = [], set()
    if by_name.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not token")
    ref = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    if not ref or not ref.get("name") or not ref.get("key"):
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
    else:
        secrets.add((ref["name"], ref["key"]))
    return problems, secrets


def ray_cluster_spec_problems(spec: dict, image: str, head_cpus: str = "0") -> tuple[list[str], set]:
    """The fields KubeRay requires, autoscaling from zero GPU pods, token auth on every container,
    the head advertising ``trial_driver`` (and ``head_cpus`` CPUs: none, except for a RayJob's
    driver that preprocesses there)."""
    problems, secrets = [], set()

    def check_auth(env, where):
        found, refs = auth_problems(env, where)
        problems.extend(found)
        secrets.update(refs)

    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    check_auth((spec.get("autoscalerOptions") or {}).get("env"), "autoscaler")
    head = spec["headGroupSpec"]
    params = head.get("rayStartParams")
    if not isinstance(params, dict) or params.get("num-cpus") != head_cpus or params.get("dashboard-host") != "0.0.0.0":
        problems.append(f"head rayStartParams {params}: want num-cpus {head_cpus!r} and dashboard-host 0.0.0.0")
    elif json.loads(json.loads(params.get("resources", '"{}"'))).get(HEAD_RESOURCE, 0) < 1:
        problems.append(f"head rayStartParams {params}: {HEAD_RESOURCE} not advertised (trial drivers could "
                        f"land on spot pods)")
    (head_container, *_) = head["template"]["spec"]["containers"]
    if head_container.get("image") != image:
        problems.append(f"head image {head_container.get('image')} is not {image}")
    check_auth(head_container.get("env"), "head")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no worker group")
    for group in groups:
        name = group.get("groupName")
        missing = [key for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                                   "template") if key not in group]
        if missing:
            problems.append(f"worker group {name}: missing {missing}")
            continue
        if group["minReplicas"] != 0 or not group["maxReplicas"] > 0 or group["replicas"] != 0:
            problems.append(f"worker group {name}: must start at 0 replicas and be able to scale")
        (container, *_) = group["template"]["spec"]["containers"]
        resources = container.get("resources", {})
        if int(resources.get("limits", {}).get("nvidia.com/gpu", 0)) < 1:
            problems.append(f"worker group {name}: no nvidia.com/gpu limit")
        if resources.get("requests") != resources.get("limits"):
            problems.append(f"worker group {name}: requests differ from limits")
        if container.get("image") != image:
            problems.append(f"worker group {name}: image {container.get('image')} is not {image}")
        check_auth(container.get("env"), f"worker group {name}")
    # KubeRay's rayStartParams is a map[string]string: `num-cpus: 0` is rejected by the API server.
    for params_of_group in [params or {}] + [group.get("rayStartParams") or {} for group in groups]:
        for key, value in params_of_group.items():
            if not isinstance(value, str):
                problems.append(f"rayStartParams {key}: {value!r} is not a string")
    return problems, secrets


def kuberay_problems(doc: dict, image: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or not doc.get("metadata", {}).get("name"):
        problems.append("not a named ray.io/v1 object")
    if doc.get("kind") == "RayCluster":
        spec = doc["spec"]
    elif doc.get("kind") == "RayService":
        spec = doc["spec"].get("rayClusterConfig")
        if spec is None:
            return problems + ["RayService without rayClusterConfig"]
        problems += serve_config_problems(yaml.safe_load(doc["spec"].get("serveConfigV2") or "{}"))
        ports = {port.get("name"): port.get("containerPort")
                 for port in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("ports", [])}
        if ports.get("serve") != 8000:
            problems.append("the head has no port named serve (8000), where KubeRay's serve service sends traffic")
    elif doc.get("kind") == "RayJob":
        spec = doc["spec"].get("rayClusterSpec")
        if spec is None:
            return problems + ["RayJob without rayClusterSpec"]
        if doc["spec"].get("shutdownAfterJobFinishes") is not True:
            problems.append("RayJob keeps its cluster after the job (shutdownAfterJobFinishes)")
        if not isinstance(doc["spec"].get("ttlSecondsAfterFinished"), int):
            problems.append("RayJob has no ttlSecondsAfterFinished")
        # The driver on the head, where losing a GPU pod cannot end the job; a failed job retried.
        if json.loads(doc["spec"].get("entrypointResources") or "{}").get(HEAD_RESOURCE) is None:
            problems.append(f"RayJob driver does not ask for {HEAD_RESOURCE}: it may run on a GPU pod")
        if not doc["spec"].get("backoffLimit", 0) >= 1:
            problems.append("RayJob has no backoffLimit: a failed job is never submitted again")
    else:
        return problems + [f"unexpected kind {doc.get('kind')}"]
    found, secrets = ray_cluster_spec_problems(spec, image, head_cpus="2" if doc["kind"] == "RayJob" else "0")
    problems += found
    if len(secrets) != 1:
        problems.append(f"containers read the token from different Secrets: {secrets}")
    if spec.get("rayVersion") != image_ray_version(DOCKERFILE.read_text()):
        problems.append(f"rayVersion {spec.get('rayVersion')} is not the image's Ray")
    return problems


def serve_config_problems(config: dict) -> list[str]:
    """A Serve config (``serve deploy`` file or a RayService's serveConfigV2) that Ray's own schema
    accepts, whose application is ours and whose args are valid serve settings."""
    from ray.serve.schema import ServeDeploySchema

    from pipeline.config import ConfigError, check_value

    try:
        schema = ServeDeploySchema.model_validate(config)
    except Exception as error:  # noqa: BLE001 - pydantic's ValidationError
        return [f"not a Serve config: {str(error).splitlines()[0]}"]
    problems = []
    for application in schema.applications:
        if application.import_path != "pipeline.serve:app_from_args":
            problems.append(f"application {application.name} imports {application.import_path}")
        for key, value in (application.args or {}).items():
            try:
                check_value(f"serve.{key}", value)
            except ConfigError as error:
                problems.append(f"application {application.name}: {error}")
    if schema.http_options.host != "0.0.0.0":
        problems.append("the proxies listen on localhost only: other machines cannot reach the endpoint")
    return problems


def test_serve_config_file_is_valid_and_builds_our_application(tmp_path):
    config = load(SERVE_CONFIG)
    assert serve_config_problems(config) == []
    (application,) = config["applications"]
    assert application["runtime_env"]["env_vars"] == WORKER_ENV_VARS
    # The same args with a real model build the application `serve deploy` would run.
    from pipeline.serve import app_from_args

    built = app_from_args({**application["args"], "model": export_served_model(str(tmp_path / "export"))})
    assert built._bound_deployment.ray_actor_options["num_gpus"] == 1
    broken = copy.deepcopy(config)
    broken["applications"][0]["args"]["max_batch_size"] = 0
    broken["http_options"]["host"] = "127.0.0.1"
    problems = serve_config_problems(broken)
    assert any("'serve.max_batch_size' must be >= 1" in problem for problem in problems)
    assert any("localhost only" in problem for problem in problems)


def secret_created_in_comments(text: str) -> tuple[str, str]:
    """The Secret the manifest's instructions create: kubectl create secret generic NAME --from-file=KEY=..."""
    (found,) = set(re.findall(r"kubectl create secret generic (\S+) --from-file=([\w.-]+)=", text))
    return found


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_kuberay_manifest_has_the_required_fields(manifest):
    path = KUBERAY_MANIFESTS[manifest]
    (doc,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert kuberay_problems(doc, dockerfile_image_name(DOCKERFILE.read_text())) == []


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_kuberay_token_comes_from_the_secret_the_instructions_create(manifest):
    text = KUBERAY_MANIFESTS[manifest].read_text()
    doc = yaml.safe_load(text)
    spec = {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()
    _, secrets = ray_cluster_spec_problems(spec, image="")
    assert secrets == {secret_created_in_comments(text)}
    auth_options = spec.get("authOptions")
    if auth_options:  # the operator must read the same token it polls the dashboard with
        assert auth_options == {"mode": "token", "secretName": secret_created_in_comments(text)[0]}


def test_rayjob_trains_on_gpus_with_the_worker_environment():
    spec = load(KUBERAY_MANIFESTS["rayjob"])["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and words[1].endswith("jobs/train.py")
    assert words[words.index("--config") + 1].endswith("configs/fast.yaml")
    settings = dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--set")
    assert settings["scaling.use_gpu"] == "true" and settings["scaling.num_workers"] == "2"
    assert settings["data.output"].startswith("s3://") and settings["run.storage_path"].startswith("s3://")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == WORKER_ENV_VARS
    # The driver runs on the head (trial_driver) and reserves no CPU there: the head's CPUs are for
    # the decode tasks of a driver that preprocesses (they run on its node).
    assert spec["entrypointNumCpus"] == 0 and json.loads(spec["entrypointResources"]) == {HEAD_RESOURCE: 1}
    params = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert int(params["num-cpus"]) >= 1


def test_broken_kuberay_manifests_are_rejected():
    image = dockerfile_image_name(DOCKERFILE.read_text())
    doc = load(KUBERAY_MANIFESTS["raycluster"])
    group = "spec/workerGroupSpecs"
    worker = doc["spec"]["workerGroupSpecs"][0]
    no_gpu = copy.deepcopy(worker)
    del no_gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    no_auth = copy.deepcopy(worker)
    no_auth["template"]["spec"]["containers"][0]["env"] = []
    for broken, expected in (
        (_set(doc, "spec/enableInTreeAutoscaling", False), "enableInTreeAutoscaling"),
        (_set(doc, group, [no_gpu]), "no nvidia.com/gpu limit"),
        (_set(doc, group, [no_auth]), "RAY_AUTH_MODE is not token"),
        (_set(doc, group, [{**worker, "minReplicas": 1}]), "must start at 0"),
        (_set(doc, "spec/headGroupSpec/rayStartParams", {"num-cpus": 0}), "want num-cpus '0'"),
        (_set(doc, "spec/rayVersion", "2.49.0"), "is not the image's Ray"),
    ):
        assert any(expected in problem for problem in kuberay_problems(broken, image)), expected
    # An image other than the Dockerfile's (e.g. the bare Ray image, which lacks TensorFlow).
    assert any("image" in problem for problem in kuberay_problems(doc, "rayproject/ray:2.60.0-py311-gpu"))
    job = load(KUBERAY_MANIFESTS["rayjob"])
    head_params = "spec/rayClusterSpec/headGroupSpec/rayStartParams"
    for broken, expected in (
        (_set(job, "spec/entrypointResources", "{}"), "may run on a GPU pod"),
        (_set(job, "spec/backoffLimit", 0), "no backoffLimit"),
        (_set(job, head_params, {"num-cpus": "2", "dashboard-host": "0.0.0.0"}), "trial_driver not advertised"),
    ):
        assert any(expected in problem for problem in kuberay_problems(broken, image)), expected


# ------------------------------------------------------------------ runtime environment for ray job submit

def test_ray_job_submit_accepts_a_runtime_env_file():
    from ray.dashboard.modules.job.cli import submit

    assert "runtime_env" in {param.name for param in submit.params}


def test_runtime_env_file_is_valid_and_carries_the_worker_environment(monkeypatch):
    # Exactly what `ray job submit --runtime-env cluster/runtime-env.yaml --working-dir .` builds,
    # run from the repository root as the README says.
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(REPO)

    runtime_env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    RuntimeEnv(**runtime_env)  # Ray's own field validation
    assert load(RUNTIME_ENV)["working_dir"] == "."
    assert runtime_env["env_vars"] == WORKER_ENV_VARS


def test_runtime_env_leaves_data_and_runs_behind():
    # Private API: the matcher Ray applies to `excludes` when it zips the working dir.
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, load(RUNTIME_ENV)["excludes"])
    for path in ("artifacts/runs/fast/checkpoint_000001/model.keras", "artifacts/data/manifest.json",
                 "somewhere/shard.parquet", ".git/HEAD", "pipeline/__pycache__/config.cpython-311.pyc"):
        assert excluded(REPO / path), path
    # Every file of the package ships: an unanchored "data/" once dropped pipeline/data/ from jobs.
    code = [*REPO.glob("pipeline/**/*.py"), *REPO.glob("jobs/*.py"), *REPO.glob("configs/*.yaml"), REPO / "pyproject.toml"]
    assert any("pipeline/data/" in str(path) for path in code)
    for path in code:
        assert not excluded(path), path


def test_all_assets_agree_on_the_ray_version():
    dockerfile = image_ray_version(DOCKERFILE.read_text())
    for path in LAUNCHER_CONFIGS.values():
        assert image_ray_version(load(path)["docker"]["image"]) == dockerfile, path.name
