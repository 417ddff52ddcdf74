"""The deployable cluster files in `cluster/`, checked offline (no cloud, no Kubernetes).

- Every YAML file in cluster/ is validated by its kind, found from its content: cluster launcher
  configs (`ray up`) go through `validate_config(prepare_config(config))`, the checks `ray up` runs
  before it talks to the cloud (prepare_config merges the provider's defaults.yaml from the
  installed package, no cloud access); KubeRay RayCluster and RayJob manifests through the JSON
  Schemas generated from KubeRay's CRDs (`cluster/schemas/kuberay`, v1.7; the CRDs' CEL rules are
  not evaluated). A new file is covered without touching this module.
- The project's rules hold for every file, whatever its shape: heads with no CPUs, groups from
  zero, GPU groups that ask for and tolerate GPUs, spot preferred over on-demand, token auth, the
  project image everywhere, no setup at boot, RayJobs that cannot hang or linger, and for AWS the
  head's right to hand the workers their role.
- The READMEs list every value to set and show the IAM policies as the files hold them.
- Not covered: what needs a cloud account or a Kubernetes cluster (IAM, quotas, subnets, images).

Every check also runs on a broken copy, so each one is known to be able to fail.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest

from cluster_files import (CLUSTER, CLUSTER_README, IMAGE_NAME, JOBS_ON_KUBERAY, KINDS, KUBERAY_FILES,
                           LAUNCHER_FILES, RAYCLUSTER_FILES, RAYJOB_FILES, YAML_FILES, cluster_spec,
                           file_id, gpus_of, groups, has_gpu_group, image_problem, job_commands, kind_of,
                           load, mutated, pinned_ray_version, ray_container, rename_key)

KUBERAY_SCHEMAS = CLUSTER / "schemas" / "kuberay"
HEAD_POLICY = CLUSTER / "aws-head-policy.json"
WORKER_POLICY = CLUSTER / "aws-worker-policy.json"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MACHINES: dict[str, tuple[int, int]] = {
    # AWS instance types: (vCPUs, GPUs)
    "m5.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "g5.2xlarge": (8, 1), "g6.2xlarge": (8, 1), "p5.48xlarge": (192, 8),
    # Google Cloud machine types, GPUs attached with the type (guestAccelerators add theirs)
    "n2-standard-8": (8, 0), "n2-standard-16": (16, 0), "n1-standard-8": (8, 0),
    "g2-standard-8": (8, 1), "a3-highgpu-8g": (208, 8),
}
"""The shapes of the machine types our launcher configs use, from the clouds' instance pages; a
config naming another type must add it here, so every declared shape is checked."""
ACCELERATOR_LABELS = ("karpenter.k8s.aws/instance-gpu-name", "cloud.google.com/gke-accelerator",
                      "nvidia.com/gpu.product", "node.kubernetes.io/instance-type")
"""Node labels that say which GPU a node has (Karpenter, GKE, NVIDIA GPU feature discovery)."""
CAPACITY_LABELS = {"karpenter.sh/capacity-type": {"spot": "spot", "on-demand": "on-demand"},
                   "eks.amazonaws.com/capacityType": {"SPOT": "spot", "ON_DEMAND": "on-demand"},
                   "cloud.google.com/gke-spot": {"true": "spot"}}


def test_every_yaml_in_cluster_is_a_launcher_config_or_a_kuberay_manifest():
    assert YAML_FILES and {path: kind for path, kind in KINDS.items() if kind == "unknown"} == {}
    assert set(LAUNCHER_FILES) | set(KUBERAY_FILES) == set(YAML_FILES)
    assert {load(path)["provider"]["type"] for path in LAUNCHER_FILES} >= {"aws", "gcp"}
    assert RAYCLUSTER_FILES and RAYJOB_FILES
    assert kind_of({"apiVersion": "v1", "kind": "ConfigMap"}) == "unknown"
    assert kind_of({"provider": {"type": "aws"}}) == "unknown"


# ------------------------------------------------------------------------- cluster launcher


def validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"]}


def first_gpu_type(config: dict[str, Any]) -> dict[str, Any]:
    return next(node for node in worker_types(config).values() if node["resources"].get("GPU", 0) > 0)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=file_id)
def test_launcher_config_passes_ray_up_validation(path):
    prepared = validate_like_ray_up(load(path))
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


LAUNCHER_SCHEMA_BREAKS = [
    pytest.param(lambda config: rename_key(config, "max_workers", "max_worker"),
                 "'max_worker' was unexpected", id="top-level-key"),
    pytest.param(lambda config: rename_key(first_gpu_type(config), "max_workers", "maxWorkers"),
                 "'maxWorkers' was unexpected", id="node-type-key"),
    pytest.param(lambda config: first_gpu_type(config)["resources"].update(GPU=0.5),
                 "0.5 is not of type 'integer'", id="fractional-resource"),
    pytest.param(lambda config: first_gpu_type(config).update(priority="high"),
                 "'high' is not of type 'integer'", id="priority-type"),
    pytest.param(lambda config: rename_key(config["docker"], "pull_before_run", "pull_before_start"),
                 "'pull_before_start' was unexpected", id="docker-key"),
    pytest.param(lambda config: config.update(head_node_type="ray.head.default"),
                 "head_node_type` must be one of", id="unknown-head-type"),
]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=file_id)
@pytest.mark.parametrize("change, message", LAUNCHER_SCHEMA_BREAKS)
def test_launcher_validation_rejects_broken_copies(path, change, message):
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_like_ray_up(mutated(load(path), change))


def declared_shape(node: dict[str, Any]) -> tuple[str, int, int] | None:
    """(machine type, vCPUs, GPUs) of a node type's machine, None for an unknown type."""
    node_config = node["node_config"]
    machine = node_config.get("InstanceType") or node_config.get("machineType", "")
    if machine not in MACHINES:
        return None
    cpus, gpus = MACHINES[machine]
    gpus += sum(accelerator.get("acceleratorCount", 0)
                for accelerator in node_config.get("guestAccelerators", []))
    return machine, cpus, gpus


def is_spot(node: dict[str, Any]) -> bool:
    node_config = node["node_config"]
    scheduling = node_config.get("scheduling")
    scheduling = scheduling if isinstance(scheduling, dict) else {}
    return (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True)


def install_commands(prepared: dict[str, Any]) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    lists = [prepared.get(key, []) for key in keys]
    lists += [node.get("worker_setup_commands", []) for node in prepared["available_node_types"].values()]
    return [command for commands in lists for command in commands
            if re.search(r"\b(pip3?|conda|uv pip|apt-get) install\b", command)]


def node_type_problems(config: dict[str, Any]) -> list[str]:
    """Each node type keeps the common initialization (registry login) and declares its machine's
    true shape (the autoscaler plans with it)."""
    problems = []
    head = config["available_node_types"][config["head_node_type"]]
    common = config.get("initialization_commands", [])
    for name, node in config["available_node_types"].items():
        own = node.get("initialization_commands", common)
        if [command for command in common if command not in own]:
            problems.append(f"{name}: its initialization_commands drop the common ones (registry login)")
        shape = declared_shape(node)
        if shape is None:
            problems.append(f"{name}: machine type unknown to the tests' MACHINES table, add its shape")
            continue
        machine, cpus, gpus = shape
        declared = node["resources"]
        if gpus and declared.get("GPU") != gpus:
            problems.append(f"{name}: {machine} has {gpus} GPUs, resources say {declared.get('GPU')}")
        if not gpus and declared.get("GPU"):
            problems.append(f"{name}: {machine} has no GPU, resources say {declared['GPU']}")
        if node is not head and "CPU" in declared and declared["CPU"] != cpus:
            problems.append(f"{name}: {machine} has {cpus} vCPUs, resources say {declared['CPU']}")
    return problems


def machine(node: dict[str, Any]) -> tuple[str, ...]:
    """The machine type and the GPUs attached to it: a spot type and an on-demand type with
    the same machine differ only in price."""
    node_config = node["node_config"]
    return (node_config.get("InstanceType") or node_config.get("machineType", ""),
            *sorted(accelerator["acceleratorType"]
                    for accelerator in node_config.get("guestAccelerators", [])))


def spot_problems(config: dict[str, Any]) -> list[str]:
    """Spot GPU types beside on-demand ones, a spot type preferred by priority over the on-demand
    type of the same machine (both fit a request equally well, and the v2 autoscaler, `ray up`'s
    default since Ray 2.50, breaks such ties by priority), and an 8-GPU type."""
    problems = []
    gpu_nodes = {name: node for name, node in worker_types(config).items()
                 if node["resources"].get("GPU", 0) > 0}
    spot = {name: node for name, node in gpu_nodes.items() if is_spot(node)}
    on_demand = {name: node for name, node in gpu_nodes.items() if not is_spot(node)}
    if not spot or not on_demand:
        problems.append(f"want spot GPU types beside on-demand ones: spot {sorted(spot)}, "
                        f"on-demand {sorted(on_demand)}")
    for name, node in spot.items():
        rivals = [other.get("priority", 0) for other in on_demand.values() if machine(other) == machine(node)]
        if rivals and node.get("priority", 0) <= max(rivals):
            problems.append(f"{name}: a spot type needs a higher priority than the on-demand type "
                            "of its machine")
    if not any(node["resources"]["GPU"] >= 8 for node in gpu_nodes.values()):
        problems.append("no 8-GPU (H100-class) node type")
    return problems


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """The project's rules for a launcher config (beyond Ray's schema), on any provider."""
    problems = []
    prepared = validate_like_ray_up(config)
    head = config["available_node_types"][config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append("the head must advertise CPU 0 so no task is scheduled on it")
    workers = worker_types(config)
    for name, node in workers.items():
        if node.get("min_workers", 0) != 0 or node.get("max_workers", 0) < 1:
            problems.append(f"{name}: must autoscale from 0 (min_workers 0, max_workers >= 1)")
    docker = config["docker"]
    images = [docker.get(key) for key in ("image", "head_image", "worker_image")]
    images += [node.get("docker", {}).get("worker_image") for node in workers.values()]
    problems += [problem for image in images if image for problem in [image_problem(image)] if problem]
    run_options = " ".join(docker.get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_options:
        problems.append("token auth (RAY_AUTH_MODE=token) is not set for the containers")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("the token file is not mounted at ~/.ray/auth_token")
    if "--shm-size" in run_options or docker.get("disable_shm_size_detection"):
        problems.append("/dev/shm sizing: leave it to the launcher's per-node detection")
    problems += [f"installs at every boot (the image has everything): {command}"
                 for command in install_commands(prepared)]
    problems += node_type_problems(config)
    problems += spot_problems(config)
    provider = config["provider"]["type"]
    if provider == "aws":
        problems += aws_problems(config)
    if provider == "gcp":
        problems += gcp_problems(config)
    return problems


def instance_profile(node: dict[str, Any]) -> str | None:
    return node["node_config"].get("IamInstanceProfile", {}).get("Arn")


def as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def passable_roles(policy: dict[str, Any]) -> set[str]:
    """Role ARNs an IAM policy lets its holder pass (iam:PassRole, by exact ARN)."""
    roles = set()
    for statement in policy["Statement"]:
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        if statement["Effect"] == "Allow" and "iam:PassRole" in actions:
            roles.update(resources)
    return roles


def aws_problems(config: dict[str, Any], head_policy: dict[str, Any] | None = None) -> list[str]:
    """The head gets its own role, which may pass the workers' role (worker launches fail
    with UnauthorizedOperation otherwise: ray-project/ray#9327)."""
    problems = []
    policy = head_policy or json.loads(HEAD_POLICY.read_text())
    head = config["available_node_types"][config["head_node_type"]]
    head_profile = instance_profile(head)
    if not head_profile:
        problems.append("the head has no instance profile of its own")
    for name, node in worker_types(config).items():
        profile = instance_profile(node)
        match = re.fullmatch(r"arn:aws:iam::([^:]+):instance-profile/(.+)", profile or "")
        if not match:
            problems.append(f"{name}: no worker instance profile (workers get no AWS credentials)")
            continue
        if profile == head_profile:
            problems.append(f"{name}: shares the head's profile; workers need none of its EC2 rights")
        role = f"arn:aws:iam::{match.group(1)}:role/{match.group(2)}"
        if role not in passable_roles(policy):
            problems.append(f"{name}: the head's policy does not grant iam:PassRole on {role}")
    return problems


def gcp_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        scheduling = node_config.get("scheduling", {})
        if not isinstance(scheduling, dict):
            problems.append(f"{name}: scheduling must be a mapping, as Compute Engine's API takes it "
                            "(Ray's examples give a list: ray-project/ray#46248)")
            continue
        if is_spot(node) and scheduling.get("automaticRestart") is not False:
            problems.append(f"{name}: spot VMs need automaticRestart false")
        if node["resources"].get("GPU", 0) > 0:
            if scheduling.get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GPU VMs need onHostMaintenance TERMINATE")
            items = {item["key"]: item["value"] for item in node_config.get("metadata", {}).get("items", [])}
            if items.get("install-nvidia-driver") != "True":
                problems.append(f"{name}: no install-nvidia-driver metadata (the driver is not installed)")
            attached = re.match(r"(a2|a3|a4|g2)-", node_config.get("machineType", ""))
            if not attached and not node_config.get("guestAccelerators"):
                problems.append(f"{name}: a GPU type needs guestAccelerators or an "
                                "accelerator-optimized machine type")
        if name == config["head_node_type"]:
            continue
        accounts = node_config.get("serviceAccounts", [])
        if not accounts or not accounts[0].get("email"):
            problems.append(f"{name}: no service account (the workers could not reach the bucket)")
        elif CLOUD_PLATFORM_SCOPE not in accounts[0].get("scopes", []):
            problems.append(f"{name}: service account without the cloud-platform scope")
    return problems


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=file_id)
def test_launcher_config_follows_the_project_rules(path):
    assert launcher_problems(load(path)) == []


def gpu_types(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [node for node in worker_types(config).values() if node["resources"].get("GPU", 0) > 0]


def spot_gpu_type(config: dict[str, Any]) -> dict[str, Any]:
    return next(node for node in gpu_types(config) if is_spot(node))


def twinned_spot_type(config: dict[str, Any]) -> dict[str, Any]:
    """A spot GPU type whose machine also has an on-demand type."""
    return next(node for node in gpu_types(config) if is_spot(node) and any(
        machine(other) == machine(node) for other in gpu_types(config) if not is_spot(other)))


def drop_node_types(config: dict[str, Any], which: Callable[[dict[str, Any]], bool]) -> None:
    for name, node in worker_types(config).items():
        if which(node):
            config["available_node_types"].pop(name)


def node_type_with_own_initialization(config: dict[str, Any]) -> dict[str, Any]:
    return next(node for node in config["available_node_types"].values()
                if "initialization_commands" in node)


LAUNCHER_RULE_BREAKS = [
    pytest.param(lambda config: config["available_node_types"][config["head_node_type"]].update(resources={}),
                 "CPU 0", id="head-cpus"),
    pytest.param(lambda config: first_gpu_type(config).update(min_workers=1), "autoscale from 0",
                 id="min-workers"),
    pytest.param(lambda config: config["docker"]["run_options"].append("--shm-size=64m"), "/dev/shm",
                 id="shm"),
    pytest.param(lambda config: config["docker"].update(image="rayproject/ray:2.60.0-py311-gpu"), "image",
                 id="image"),
    pytest.param(lambda config: config["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token"), "token",
                 id="auth"),
    pytest.param(lambda config: config.pop("setup_commands"), "installs at every boot", id="boot-install"),
    pytest.param(lambda config: node_type_with_own_initialization(config).update(initialization_commands=[]),
                 "drop the common ones", id="initialization"),
    pytest.param(lambda config: first_gpu_type(config)["resources"].update(GPU=2), "GPUs, resources say 2",
                 id="gpu-shape"),
    pytest.param(lambda config: first_gpu_type(config)["resources"].update(CPU=64), "vCPUs", id="cpu-shape"),
    pytest.param(lambda config: twinned_spot_type(config).update(priority=-1), "higher priority",
                 id="priority"),
    pytest.param(lambda config: drop_node_types(config, lambda node: node["resources"].get("GPU", 0) >= 8),
                 "8-GPU", id="no-h100"),
    pytest.param(lambda config: drop_node_types(config, is_spot), "spot GPU types", id="no-spot"),
]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=file_id)
@pytest.mark.parametrize("change, problem", LAUNCHER_RULE_BREAKS)
def test_launcher_rules_catch_broken_copies(path, change, problem):
    problems = launcher_problems(mutated(load(path), change))
    assert any(problem in text for text in problems), problems


def launcher_file(provider: str) -> Path:
    return next(path for path in LAUNCHER_FILES if load(path)["provider"]["type"] == provider)


@pytest.mark.parametrize("change, problem", [
    pytest.param(lambda config: config["available_node_types"][config["head_node_type"]]["node_config"]
                 .pop("IamInstanceProfile"), "head has no instance profile", id="head-profile"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].update(
        IamInstanceProfile={"Arn": "arn:aws:iam::YOUR-ACCOUNT-ID:instance-profile/OTHER-ROLE"}),
        "iam:PassRole on arn:aws:iam::YOUR-ACCOUNT-ID:role/OTHER-ROLE", id="unpassable-role"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].pop("IamInstanceProfile"),
                 "no worker instance profile", id="worker-profile"),
])
def test_aws_rules_catch_broken_copies(change, problem):
    problems = aws_problems(mutated(load(launcher_file("aws")), change))
    assert any(problem in text for text in problems), problems


def test_aws_rules_catch_a_head_policy_without_pass_role():
    policy = json.loads(HEAD_POLICY.read_text())
    policy["Statement"] = [statement for statement in policy["Statement"] if "iam:PassRole" not in
                           str(statement["Action"])]
    problems = aws_problems(load(launcher_file("aws")), policy)
    assert any("does not grant iam:PassRole" in text for text in problems), problems


@pytest.mark.parametrize("change, problem", [
    pytest.param(lambda config: spot_gpu_type(config)["node_config"].update(
        scheduling=[{"preemptible": True}, {"onHostMaintenance": "TERMINATE"}]), "mapping",
        id="scheduling-list"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].update(
        scheduling={"onHostMaintenance": "MIGRATE"}), "TERMINATE", id="maintenance"),
    pytest.param(lambda config: spot_gpu_type(config)["node_config"].update(
        scheduling={"provisioningModel": "SPOT", "onHostMaintenance": "TERMINATE"}), "automaticRestart",
        id="spot-restart"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].update(metadata={"items": []}),
                 "install-nvidia-driver", id="driver"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].update(machineType="n1-standard-8")
                 or first_gpu_type(config)["node_config"].pop("guestAccelerators", None),
                 "guestAccelerators", id="no-accelerator"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].update(serviceAccounts=[]),
                 "no service account", id="service-account"),
    pytest.param(lambda config: first_gpu_type(config)["node_config"].update(
        serviceAccounts=[{"email": "worker@project.iam.gserviceaccount.com",
                          "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]}]),
        "cloud-platform", id="scope"),
])
def test_gcp_rules_catch_broken_copies(change, problem):
    problems = gcp_problems(mutated(load(launcher_file("gcp")), change))
    assert any(problem in text for text in problems), problems


def policy_grants(policy: dict[str, Any], action: str, resource: str) -> bool:
    for statement in policy["Statement"]:
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        if statement["Effect"] == "Allow" and action in actions and resource in resources:
            return True
    return False


@pytest.mark.parametrize("path", [HEAD_POLICY, WORKER_POLICY], ids=file_id)
def test_aws_roles_reach_the_bucket_and_the_image(path):
    policy = json.loads(path.read_text())
    assert policy_grants(policy, "s3:ListBucket", "arn:aws:s3:::YOUR-BUCKET")
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert policy_grants(policy, action, "arn:aws:s3:::YOUR-BUCKET/*"), action
    for action in ("ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
        assert policy_grants(policy, action, "*"), action
    assert not policy_grants(policy, "s3:GetObject", "arn:aws:s3:::OTHER-BUCKET/*")


# -------------------------------------------------------------------------------------- KubeRay


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((KUBERAY_SCHEMAS / {"RayCluster": "raycluster_v1.json",
                                            "RayJob": "rayjob_v1.json"}[kind]).read_text())
    validator_class = jsonschema.validators.validator_for(schema, jsonschema.Draft7Validator)
    return validator_class(schema)


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    errors = kuberay_validator(manifest["kind"]).iter_errors(manifest)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=file_id)
def test_kuberay_manifest_matches_the_crd_schema(path):
    assert schema_errors(load(path)) == []


@pytest.mark.parametrize("path, change, where", [
    (RAYCLUSTER_FILES[0], lambda manifest: rename_key(cluster_spec(manifest)["workerGroupSpecs"][0],
                                                      "maxReplicas", "maxReplica"), "workerGroupSpecs.0"),
    (RAYCLUSTER_FILES[0], lambda manifest: cluster_spec(manifest)["authOptions"].update(mode="tokens"),
     "authOptions.mode"),
    (RAYCLUSTER_FILES[0], lambda manifest: rename_key(cluster_spec(manifest), "enableInTreeAutoscaling",
                                                      "enableAutoscaling"), "spec"),
    (RAYCLUSTER_FILES[0],
     lambda manifest: cluster_spec(manifest)["workerGroupSpecs"][-1].update(priority="high"), "priority"),
    (RAYJOB_FILES[0], lambda manifest: rename_key(manifest["spec"], "shutdownAfterJobFinishes",
                                                  "shutdownAfterJobFinish"),
     "'shutdownAfterJobFinish' was unexpected"),
    (RAYJOB_FILES[0], lambda manifest: manifest["spec"].update(preRunningDeadlineSeconds=0),
     "preRunningDeadlineSeconds"),
    (RAYJOB_FILES[0], lambda manifest: rename_key(cluster_spec(manifest)["workerGroupSpecs"][0],
                                                  "maxReplicas", "maxReplica"),
     "rayClusterSpec.workerGroupSpecs.0"),
], ids=["maxReplica", "auth-mode", "spec-key", "priority-type", "job-field", "deadline-minimum",
        "rayjob-maxReplica"])
def test_kuberay_schema_rejects_broken_copies(path, change, where):
    errors = schema_errors(mutated(load(path), change))
    assert any(where in error for error in errors), errors


def capacity_type(pod: dict[str, Any]) -> str | None:
    selector = pod.get("nodeSelector", {})
    for label, values in CAPACITY_LABELS.items():
        if label in selector:
            return values.get(str(selector[label]))
    return None


def environment(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def kuberay_problems(spec: dict[str, Any]) -> list[str]:
    """The project's rules for a RayCluster spec (beyond the CRD schema)."""
    problems = []
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("token auth (authOptions.mode: token) is off")
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("autoscaling is off")
    if spec.get("rayVersion") != pinned_ray_version():
        problems.append(f"rayVersion {spec.get('rayVersion')} does not match the ray pin")
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append("the head must start with num-cpus 0 so no task is scheduled on it")
    if any("priority" in group for group in spec["workerGroupSpecs"]) \
            and spec.get("autoscalerOptions", {}).get("version") != "v2":
        problems.append("worker-group priority is honoured only by autoscalerOptions.version v2")
    for name, group in groups(spec):
        pod = group["template"]["spec"]
        container = ray_container(group)
        problems += [f"{name}: {problem}" for item in pod["containers"]
                     for problem in [image_problem(item["image"])] if problem]
        if not pod.get("serviceAccountName"):
            problems.append(f"{name}: no serviceAccountName (the pods' way to S3 credentials)")
        if "memory" not in container["resources"].get("limits", {}):
            problems.append(f"{name}: no memory limit (KubeRay sizes /dev/shm from it)")
        if any(mount["mountPath"] == "/dev/shm" for item in pod["containers"]
               for mount in item.get("volumeMounts", [])):
            problems.append(f"{name}: mounts its own /dev/shm (KubeRay mounts one sized to the memory limit)")
        from_zero = group.get("replicas", 0) == group.get("minReplicas") == 0 < group.get("maxReplicas", 0)
        if name != "head" and not from_zero:
            problems.append(f"{name}: must autoscale from 0 (replicas and minReplicas 0, maxReplicas >= 1)")
        gpus = gpus_of(group)
        if gpus:
            if float(container["resources"].get("requests", {}).get("nvidia.com/gpu", gpus)) != gpus:
                problems.append(f"{name}: GPU request differs from the limit")
            tolerated = {toleration.get("key") for toleration in pod.get("tolerations", [])}
            if "nvidia.com/gpu" not in tolerated:
                problems.append(f"{name}: does not tolerate the nvidia.com/gpu taint of GPU nodes")
            if not any(label in pod.get("nodeSelector", {}) for label in ACCELERATOR_LABELS):
                problems.append(f"{name}: no accelerator nodeSelector")
        elif environment(container).get("NVIDIA_VISIBLE_DEVICES") != "void":
            problems.append(f"{name}: a pod without GPUs needs NVIDIA_VISIBLE_DEVICES=void")
    if capacity_type(spec["headGroupSpec"]["template"]["spec"]) == "spot":
        problems.append("head on spot: losing it loses every job")
    gpu_groups = [group for _, group in groups(spec)[1:] if gpus_of(group)]
    spot = [group for group in gpu_groups if capacity_type(group["template"]["spec"]) == "spot"]
    on_demand = [group for group in gpu_groups if capacity_type(group["template"]["spec"]) == "on-demand"]
    if gpu_groups and (not spot or not on_demand):
        problems.append("want a spot GPU group beside an on-demand one")
    for group in spot:
        shape = (ray_container(group)["resources"]["limits"].get("cpu"), gpus_of(group))
        rivals = [other.get("priority", 0) for other in on_demand
                  if (ray_container(other)["resources"]["limits"].get("cpu"), gpus_of(other)) == shape]
        if rivals and group.get("priority", 0) <= max(rivals):
            problems.append(f"{group['groupName']}: a spot group needs a higher priority than on-demand ones")
    return problems


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=file_id)
def test_kuberay_cluster_follows_the_project_rules(path):
    assert kuberay_problems(cluster_spec(load(path))) == []


def gpu_group(spec: dict[str, Any], capacity: str = "spot") -> dict[str, Any]:
    return next(group for group in spec["workerGroupSpecs"]
                if gpus_of(group) and capacity_type(group["template"]["spec"]) == capacity)


def cpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    return next(group for group in spec["workerGroupSpecs"] if not gpus_of(group))


def shm_volume(spec: dict[str, Any]) -> None:
    pod = gpu_group(spec)["template"]["spec"]
    pod["containers"][0]["volumeMounts"] = [{"mountPath": "/dev/shm", "name": "shared-memory"}]
    pod["volumes"] = [{"name": "shared-memory", "emptyDir": {"medium": "Memory", "sizeLimit": "10Gi"}}]


KUBERAY_RULE_BREAKS = [
    pytest.param(lambda spec: spec.pop("authOptions"), "token auth", id="auth"),
    pytest.param(lambda spec: spec["headGroupSpec"]["rayStartParams"].clear(), "num-cpus 0", id="head-cpus"),
    pytest.param(lambda spec: spec.update(rayVersion="2.59.0"), "ray pin", id="ray-version"),
    pytest.param(lambda spec: spec["autoscalerOptions"].pop("version"), "v2", id="autoscaler-v1"),
    pytest.param(lambda spec: gpu_group(spec)["template"]["spec"].pop("tolerations"), "taint",
                 id="toleration"),
    pytest.param(lambda spec: gpu_group(spec)["template"]["spec"]["nodeSelector"].pop(
        "karpenter.k8s.aws/instance-gpu-name"), "accelerator nodeSelector", id="accelerator"),
    pytest.param(lambda spec: cpu_group(spec)["template"]["spec"]["containers"][0].pop("env"),
                 "NVIDIA_VISIBLE_DEVICES=void", id="visible-devices"),
    pytest.param(lambda spec: gpu_group(spec).update(minReplicas=1), "from 0", id="min-replicas"),
    pytest.param(lambda spec: gpu_group(spec)["template"]["spec"].pop("serviceAccountName"),
                 "serviceAccountName", id="service-account"),
    pytest.param(lambda spec: gpu_group(spec)["template"]["spec"]["containers"][0].update(
        image="rayproject/ray:2.60.0-py311-cu130"), "image", id="image"),
    pytest.param(lambda spec: gpu_group(spec)["template"]["spec"]["containers"][0]["resources"]["limits"]
                 .pop("memory"), "memory limit", id="memory-limit"),
    pytest.param(shm_volume, "/dev/shm", id="own-shm"),
    pytest.param(lambda spec: spec["headGroupSpec"]["template"]["spec"]["nodeSelector"].update(
        {"karpenter.sh/capacity-type": "spot"}), "head on spot", id="spot-head"),
    pytest.param(lambda spec: gpu_group(spec).update(priority=0), "higher priority", id="priority"),
    pytest.param(lambda spec: spec.update(workerGroupSpecs=[
        group for group in spec["workerGroupSpecs"]
        if capacity_type(group["template"]["spec"]) != "spot" or not gpus_of(group)]),
        "spot GPU group", id="no-spot"),
]
GPU_CLUSTER_FILES = [path for path in KUBERAY_FILES if has_gpu_group(load(path))]


@pytest.mark.parametrize("path", [GPU_CLUSTER_FILES[0], next(path for path in GPU_CLUSTER_FILES
                                                          if path in RAYJOB_FILES)], ids=file_id)
@pytest.mark.parametrize("change, problem", KUBERAY_RULE_BREAKS)
def test_kuberay_rules_catch_broken_copies(path, change, problem):
    problems = kuberay_problems(mutated(cluster_spec(load(path)), change))
    assert any(problem in text for text in problems), problems


def rayjob_problems(job: dict[str, Any]) -> list[str]:
    """A RayJob must not hang before it runs, outlive its job, or pull the GPU image twice."""
    spec = job["spec"]
    problems = []
    if not (isinstance(spec.get("preRunningDeadlineSeconds"), int) and spec["preRunningDeadlineSeconds"] > 0):
        problems.append("no preRunningDeadlineSeconds: a cluster that never starts would wait forever")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true: the cluster outlives the job")
    if "ttlSecondsAfterFinished" not in spec or "activeDeadlineSeconds" not in spec:
        problems.append("ttlSecondsAfterFinished and activeDeadlineSeconds bound the job's life")
    submitter_images = [container["image"] for container in
                        spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])]
    light_submitter = bool(submitter_images) and not any(IMAGE_NAME in image for image in submitter_images)
    if spec.get("submissionMode") != "SidecarMode" and not light_submitter:
        problems.append("the submitter would pull the multi-GB image: use SidecarMode or a light "
                        "submitter image")
    if "rayClusterSpec" not in spec:
        problems.append("no rayClusterSpec: the job's own cluster is what shutdownAfterJobFinishes deletes")
    if not job_commands(spec.get("entrypoint", "")):
        problems.append("the entrypoint runs no `python -m jobs.<name>`")
    return problems


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=file_id)
def test_rayjob_follows_the_project_rules(path):
    assert rayjob_problems(load(path)) == []


@pytest.mark.parametrize("change, problem", [
    pytest.param(lambda spec: spec.pop("preRunningDeadlineSeconds"), "preRunningDeadlineSeconds",
                 id="deadline"),
    pytest.param(lambda spec: spec.update(shutdownAfterJobFinishes=False), "outlives", id="shutdown"),
    pytest.param(lambda spec: spec.pop("ttlSecondsAfterFinished"), "bound the job", id="ttl"),
    pytest.param(lambda spec: spec.pop("submissionMode"), "pull the multi-GB image", id="submitter"),
    pytest.param(lambda spec: spec.update(submissionMode="K8sJobMode", submitterPodTemplate={"spec": {
        "containers": [{"name": "submitter", "image": "YOUR-REGISTRY/fer-pseudolabel:0.1.0"}]}}),
        "pull the multi-GB image", id="heavy-submitter"),
    pytest.param(lambda spec: spec.update(entrypoint="python train.py"), "runs no", id="entrypoint"),
])
def test_rayjob_rules_catch_broken_copies(change, problem):
    problems = rayjob_problems(mutated(load(RAYJOB_FILES[0]), lambda job: change(job["spec"])))
    assert any(problem in text for text in problems), problems


def test_a_light_submitter_image_is_accepted():
    job = mutated(load(RAYJOB_FILES[0]), lambda job: job["spec"].update(
        submissionMode="K8sJobMode", submitterPodTemplate={"spec": {"containers": [
            {"name": "submitter", "image": "quay.io/kuberay/submitter:v1.7.0"}]}}))
    assert rayjob_problems(job) == []


def test_rayjobs_cover_every_job_users_run_on_kubernetes():
    modules = {command.module for path in RAYJOB_FILES
               for command in job_commands(load(path)["spec"]["entrypoint"])}
    assert modules >= JOBS_ON_KUBERAY


# ------------------------------------------------------------------------------------- READMEs


def cluster_texts() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(CLUSTER.iterdir())
            if path.is_file() and path.suffix != ".lock"}


def unlisted_placeholders(texts: dict[str, str], readme: str) -> list[str]:
    """`YOUR-...` values in the cluster files that the README does not name."""
    placeholders = {value for text in texts.values() for value in re.findall(r"YOUR-[A-Z0-9-]+", text)}
    return sorted(value for value in placeholders if value not in readme)


def test_every_value_a_user_must_set_is_listed_in_the_readme():
    texts = cluster_texts()
    readme = texts.pop(CLUSTER_README.name)
    assert unlisted_placeholders(texts, readme) == []
    assert unlisted_placeholders(texts, readme.replace("YOUR-REGISTRY", "")) == ["YOUR-REGISTRY"]


def test_readme_shows_the_iam_policies_as_they_are_in_the_files():
    blocks = [json.loads(block)
              for block in re.findall(r"```json\n(.*?)```", CLUSTER_README.read_text(), re.S)]
    for path in (HEAD_POLICY, WORKER_POLICY):
        assert json.loads(path.read_text()) in blocks, path.name
    drifted = mutated(json.loads(HEAD_POLICY.read_text()), lambda policy: policy["Statement"].pop())
    assert drifted not in blocks


def unnamed_files(names: list[str], readme: str) -> list[str]:
    return [name for name in names if f"`{name}`" not in readme]


def test_readme_names_every_cluster_file():
    readme = CLUSTER_README.read_text()
    names = [path.name for path in sorted(CLUSTER.iterdir())
             if path.is_file() and path.name != CLUSTER_README.name]
    assert len(names) > 10 and unnamed_files(names, readme) == []
    assert unnamed_files(["kuberay-rayjob-new.yaml"], readme) == ["kuberay-rayjob-new.yaml"]
