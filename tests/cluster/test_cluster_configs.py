"""The deployable cluster configs in `cluster/`, checked offline (no cloud, no Kubernetes).

- `aws-gpu.yaml` goes through `validate_config(prepare_config(config))`, the checks `ray up` runs
  before it talks to AWS. `prepare_config` needs no cloud access for AWS (it merges the config
  with `ray/autoscaler/aws/defaults.yaml` from the installed package). What `ray up` does next
  needs an AWS account and is not covered: the IAM role, subnets, security groups and key pair,
  resolving the AMI, and filling each node type's CPU/GPU/memory in from its instance type.
- The KubeRay manifests are validated against the JSON Schemas generated from KubeRay's CRDs
  (`cluster/schemas/kuberay`, KubeRay v1.7; its README says which commit); the CEL rules of the CRDs
  (`x-kubernetes-validations`) are not evaluated, and nothing checks that the image exists.
- Every check is also run on a broken copy, so each one is known to be able to fail.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
AWS_CONFIG = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB_INGEST = CLUSTER / "kuberay-rayjob-ingest.yaml"
KUBERAY_SCHEMAS = CLUSTER / "schemas" / "kuberay"
INGEST_ENTRYPOINT = ("python -m jobs.ingest ms1mv2 --root s3://YOUR-BUCKET/faces_emore "
                     "--out s3://YOUR-BUCKET/shards --fraction 0.3333 --seed 0")
GPU_INSTANCE_FAMILIES = r"(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\."
OBJECT_STORE_SHARE = 0.3
"""Ray's default object store size as a share of a node's (container's) memory."""


def load(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def pinned_ray_version() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"]
    pins = [re.fullmatch(r"ray\[[^\]]*\]==(\S+)", dependency) for dependency in dependencies]
    [version] = [pin.group(1) for pin in pins if pin]
    return version


def mutated(document: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    broken = copy.deepcopy(document)
    change(broken)
    return broken


def rename_key(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# ------------------------------------------------------------------------ cluster launcher (AWS)


def validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """The project's own rules for the launcher config (beyond Ray's schema)."""
    problems = []
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append("the head must advertise CPU 0 so no task is scheduled on it")
    workers = {name: node for name, node in node_types.items() if node is not head}
    gpu_types = [name for name, node in workers.items()
                 if re.match(GPU_INSTANCE_FAMILIES, node["node_config"]["InstanceType"])]
    if len(gpu_types) != 1 or len(workers) != 2:
        problems.append(f"want one GPU and one CPU worker type, got {sorted(workers)}")
    for name, node in workers.items():
        if node.get("min_workers", 0) != 0 or node.get("max_workers", 0) < 1:
            problems.append(f"{name}: must autoscale from 0 (min_workers 0, max_workers >= 1)")
    docker = config["docker"]
    if not re.fullmatch(rf"rayproject/ray:{re.escape(pinned_ray_version())}-py311-gpu",
                        docker["image"]):
        problems.append(f"docker image {docker['image']} does not match the ray pin")
    run_options = " ".join(docker.get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_options:
        problems.append("token auth (RAY_AUTH_MODE=token) is not set for the containers")
    if "--shm-size" in run_options or docker.get("disable_shm_size_detection"):
        problems.append("/dev/shm sizing: leave it to the launcher's per-node detection")
    if "~/.ray/auth_token" not in config["file_mounts"]:
        problems.append("the token file is not mounted at ~/.ray/auth_token")
    if not any(re.search(r"pip install .*-e \.$", command) for command in config["setup_commands"]):
        problems.append("setup_commands do not `pip install -e .` the project")
    return problems


def test_aws_config_passes_ray_up_validation():
    prepared = validate_like_ray_up(load(AWS_CONFIG))
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda config: rename_key(config, "max_workers", "max_worker"),
                 "'max_worker' was unexpected", id="top-level-key"),
    pytest.param(lambda config: rename_key(config["available_node_types"]["gpu_worker"],
                                           "max_workers", "maxWorkers"),
                 "'maxWorkers' was unexpected", id="node-type-key"),
    pytest.param(lambda config: config["available_node_types"]["gpu_worker"]["resources"]
                 .update(GPU=0.5), "0.5 is not of type 'integer'", id="fractional-resource"),
    pytest.param(lambda config: rename_key(config["docker"], "pull_before_run",
                                           "pull_before_start"),
                 "'pull_before_start' was unexpected", id="docker-key"),
    pytest.param(lambda config: config.update(head_node_type="ray.head.default"),
                 "head_node_type` must be one of", id="unknown-head-type"),
])
def test_aws_config_validation_rejects_broken_copies(change, message):
    broken = mutated(load(AWS_CONFIG), change)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_like_ray_up(broken)


def test_aws_config_follows_the_project_rules():
    assert launcher_problems(load(AWS_CONFIG)) == []


@pytest.mark.parametrize("change, problem", [
    (lambda config: config["available_node_types"]["head"].update(resources={}), "CPU 0"),
    (lambda config: config["docker"]["run_options"].append("--shm-size=64m"), "/dev/shm"),
    (lambda config: config["docker"].update(image="rayproject/ray:2.59.0-py311-gpu"), "ray pin"),
    (lambda config: config["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token"), "token"),
    (lambda config: config["available_node_types"]["gpu_worker"]["node_config"]
     .update(InstanceType="m6i.4xlarge"), "GPU"),
])
def test_aws_config_rules_catch_broken_copies(change, problem):
    problems = launcher_problems(mutated(load(AWS_CONFIG), change))
    assert any(problem in text for text in problems), problems


# -------------------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for kind, name in (("RayCluster", "raycluster_v1.json"), ("RayJob", "rayjob_v1.json")):
        schema = json.loads((KUBERAY_SCHEMAS / name).read_text())
        validator_class = jsonschema.validators.validator_for(schema, jsonschema.Draft7Validator)
        validator_class.check_schema(schema)
        validators[kind] = validator_class(schema)
    return validators


def schema_errors(validators, manifest: dict[str, Any]) -> list[str]:
    errors = validators[manifest["kind"]].iter_errors(manifest)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB_INGEST], ids=lambda path: path.name)
def test_kuberay_manifest_matches_the_crd_schema(kuberay_validators, path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] in ("RayCluster", "RayJob")
    assert schema_errors(kuberay_validators, manifest) == []


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec if manifest["kind"] == "RayCluster" else spec["rayClusterSpec"]


@pytest.mark.parametrize("path, change, where", [
    (RAYCLUSTER, lambda spec: rename_key(spec["workerGroupSpecs"][1], "maxReplicas", "maxReplica"),
     "workerGroupSpecs.1"),
    (RAYCLUSTER, lambda spec: spec["authOptions"].update(mode="tokens"), "authOptions.mode"),
    (RAYCLUSTER, lambda spec: rename_key(spec, "enableInTreeAutoscaling", "enableAutoscaling"),
     "spec"),
    (RAYCLUSTER, lambda spec: spec["headGroupSpec"]["template"]["spec"]["volumes"][0]["emptyDir"]
     .update(mediun="Memory"), "emptyDir"),
    (RAYJOB_INGEST, lambda spec: rename_key(spec["workerGroupSpecs"][0], "maxReplicas",
                                            "maxReplica"), "workerGroupSpecs.0"),
], ids=["maxReplica", "auth-mode", "spec-key", "emptyDir-key", "rayjob-maxReplica"])
def test_kuberay_schema_rejects_broken_copies(kuberay_validators, path, change, where):
    broken = mutated(load(path), lambda manifest: change(cluster_spec(manifest)))
    errors = schema_errors(kuberay_validators, broken)
    assert any(where in error for error in errors), errors


def test_rayjob_schema_rejects_a_misspelled_job_field(kuberay_validators):
    broken = mutated(load(RAYJOB_INGEST),
                     lambda job: rename_key(job["spec"], "shutdownAfterJobFinishes",
                                            "shutdownAfterJobFinish"))
    errors = schema_errors(kuberay_validators, broken)
    assert any("'shutdownAfterJobFinish' was unexpected" in error for error in errors), errors


def quantity_bytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity (`16Gi`, `500M`, `1073741824`) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]i?)?", str(quantity))
    if not match:
        raise ValueError(f"unsupported quantity {quantity!r}")
    number, unit = float(match.group(1)), match.group(2) or ""
    base = 1024 if unit.endswith("i") else 1000
    return number * base ** (" KMGTP".index(unit[:1]) if unit else 0)


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in spec["workerGroupSpecs"]]


def kuberay_problems(spec: dict[str, Any]) -> list[str]:
    """The project's own rules for a RayCluster spec (beyond the CRD schema)."""
    problems = []
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("token auth (authOptions.mode: token) is off")
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("autoscaling is off")
    if spec.get("rayVersion") != pinned_ray_version():
        problems.append(f"rayVersion {spec.get('rayVersion')} does not match the ray pin")
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append("the head must start with num-cpus 0 so no task is scheduled on it")
    for name, group in groups(spec):
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        if name != "head" and not (group["minReplicas"] == 0 < group["maxReplicas"]):
            problems.append(f"{name}: must autoscale from 0 (minReplicas 0, maxReplicas >= 1)")
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        shared_memory = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir", {})
        if shared_memory.get("medium") != "Memory":
            problems.append(f"{name}: /dev/shm is not a memory-backed emptyDir")
            continue
        memory = quantity_bytes(container["resources"]["limits"]["memory"])
        if quantity_bytes(shared_memory.get("sizeLimit", 0)) < OBJECT_STORE_SHARE * memory:
            problems.append(f"{name}: /dev/shm sizeLimit is below the object store "
                            f"({OBJECT_STORE_SHARE:.0%} of the memory limit)")
    gpu_groups = [name for name, group in groups(spec)
                  if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]
                  .get("limits", {})]
    if not gpu_groups:
        problems.append("no GPU worker group")
    return problems


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB_INGEST], ids=lambda path: path.name)
def test_kuberay_manifest_follows_the_project_rules(path):
    assert kuberay_problems(cluster_spec(load(path))) == []


def gpu_pod(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["workerGroupSpecs"][1]["template"]["spec"]


@pytest.mark.parametrize("change, problem", [
    (lambda spec: gpu_pod(spec)["volumes"][0]["emptyDir"].update(sizeLimit="1Gi"), "sizeLimit"),
    (lambda spec: gpu_pod(spec)["volumes"][0]["emptyDir"].pop("medium"), "memory-backed"),
    (lambda spec: gpu_pod(spec)["containers"][0].pop("volumeMounts"), "memory-backed"),
    (lambda spec: spec.pop("authOptions"), "token auth"),
    (lambda spec: spec["headGroupSpec"]["rayStartParams"].clear(), "num-cpus 0"),
    (lambda spec: spec["workerGroupSpecs"].pop(1), "no GPU worker group"),
    (lambda spec: spec.update(rayVersion="2.59.0"), "ray pin"),
])
def test_kuberay_rules_catch_broken_copies(change, problem):
    problems = kuberay_problems(mutated(cluster_spec(load(RAYCLUSTER)), change))
    assert any(problem in text for text in problems), problems


def test_rayjob_runs_the_ingest_on_the_raycluster_spec():
    job, cluster = load(RAYJOB_INGEST), load(RAYCLUSTER)
    assert " ".join(job["spec"]["entrypoint"].split()) == INGEST_ENTRYPOINT
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
        "the RayJob's cluster drifted from kuberay-raycluster.yaml")


def test_quantity_bytes_reads_kubernetes_memory_quantities():
    assert quantity_bytes("16Gi") == 16 * 2**30
    assert quantity_bytes("500M") == 5e8
    assert quantity_bytes(1024) == 1024
    with pytest.raises(ValueError):
        quantity_bytes("16 GB")


# ----------------------------------------------------------------------------- shared checks


def cluster_texts() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(CLUSTER.iterdir()) if path.is_file()}


def missing_job_modules(text: str) -> list[str]:
    names = re.findall(r"python -m jobs\.(\w+)", text)
    return [name for name in names if not (REPO_ROOT / "jobs" / f"{name}.py").is_file()]


def test_every_job_the_configs_run_exists():
    texts = cluster_texts()
    mentioned = {name for text in texts.values()
                 for name in re.findall(r"python -m jobs\.(\w+)", text)}
    assert "ingest" in mentioned
    assert {name: missing_job_modules(text) for name, text in texts.items()} == {
        name: [] for name in texts}
    assert missing_job_modules("ray job submit -- python -m jobs.ingset ms1mv2") == ["ingset"]


def unlisted_placeholders(texts: dict[str, str], readme: str) -> list[str]:
    """`YOUR-...` values in the configs that the README's table does not name."""
    placeholders = {value for text in texts.values()
                    for value in re.findall(r"YOUR-[A-Z0-9-]+", text)}
    return sorted(value for value in placeholders if value not in readme)


def test_every_value_a_user_must_set_is_listed_in_the_readme():
    texts = cluster_texts()
    readme = texts.pop("README.md")
    assert "YOUR-BUCKET" in texts[RAYJOB_INGEST.name]
    assert unlisted_placeholders(texts, readme) == []
    assert unlisted_placeholders(texts, readme.replace("YOUR-REGISTRY", "")) == ["YOUR-REGISTRY"]
