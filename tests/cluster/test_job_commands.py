"""The `python -m jobs.<name>` commands the cluster files and READMEs give, run against the jobs
themselves (no cluster): each is parsed by that job's own argument parser; train and tune commands
also resolve their recipe (`--print-config`); each RayJob's pool fits its cluster at full size;
every s3:// or gs:// path a command reads is one another command writes; and the backbones the
runs start from pretrained are in the image (the pods forbid the Hugging Face hub).

Every check also runs on a broken copy, so each one is known to be able to fail.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from cluster_files import (CLUSTER, CLUSTER_README, JOBS_ON_KUBERAY, RAYJOB_FILES, REPO_ROOT, JobCommand,
                           all_commands, cluster_spec, code_lines, has_gpu_group, job_commands, load, mutated,
                           ray_container, readme_commands)

DOCKERFILE = CLUSTER / "Dockerfile"
READ_FLAGS = ("--shards", "--split", "--checkpoint", "--temporal")
READ_KEYS = ("data.split", "base.data.split", "data.labeled_pseudo_labels",
             "base.data.labeled_pseudo_labels", "model.pretrained_path", "base.model.pretrained_path")
WRITE_FLAGS = ("--out",)
WRITE_KEYS = ("storage",)


def test_job_commands_are_read_from_shell_text():
    text = ("ray job submit -- python -m jobs.train --config a.yaml \\\n    --set x=1  # why\n"
            "python -m jobs.split --out o && python -m jobs.tune --config 'b c.yaml'; echo done\n")
    assert job_commands(text) == [JobCommand("", "train", ("--config", "a.yaml", "--set", "x=1")),
                                  JobCommand("", "split", ("--out", "o")),
                                  JobCommand("", "tune", ("--config", "b c.yaml"))]
    assert code_lines("prose python -m jobs.x\n    code\n```\nfenced\n```\n") == "    code\nfenced"
    markdown = "    export DATA=s3://a\n    export DATA=gs://b\n    python -m jobs.split --out $DATA/split\n"
    assert [command.arguments for command in readme_commands(markdown, "")] == [
        ("--out", "gs://b/split"), ("--out", "s3://a/split")]
    with pytest.raises(ValueError, match="never sets"):
        readme_commands("    python -m jobs.split --out $DATA/split\n", "")


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def parsed_arguments(command: JobCommand) -> argparse.Namespace:
    """The job's own parser applied to the command's arguments; the job stops right after."""
    job = importlib.import_module(f"jobs.{command.module}")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(original(parser, args, namespace))

    errors = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(errors):
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            job.main(list(command.arguments))
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit:
            pytest.fail(f"{command.source}: jobs.{command.module} rejects its arguments: {errors.getvalue()}")
    pytest.fail(f"jobs.{command.module}.main returned without parsing its arguments")


@functools.cache
def resolved(module: str, arguments: tuple[str, ...]) -> dict[str, Any]:
    """What `python -m jobs.<train|tune> ... --print-config` prints: the validated config."""
    job = importlib.import_module(f"jobs.{module}")
    output, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
        code = job.main([*arguments, "--print-config"])
    assert code == 0, f"jobs.{module} {' '.join(arguments)}: {errors.getvalue()}"
    return yaml.safe_load(output.getvalue())


COMMANDS = all_commands()


def test_the_cluster_files_and_readmes_give_job_commands():
    assert {command.module for command in COMMANDS} >= JOBS_ON_KUBERAY | {"split"}
    assert {command.source for command in COMMANDS} >= {CLUSTER_README.name, "README.md",
                                                        *(path.name for path in RAYJOB_FILES)}


def command_id(command: JobCommand) -> str:
    return f"{command.source}:{command.module}"


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_every_job_command_parses_with_the_jobs_own_parser(command):
    assert (REPO_ROOT / "jobs" / f"{command.module}.py").is_file(), command
    assert isinstance(parsed_arguments(command), argparse.Namespace)


@pytest.mark.parametrize("command", [command for command in COMMANDS if command.module in ("train", "tune")],
                         ids=command_id)
def test_every_train_and_tune_command_resolves_its_recipe(command):
    config = resolved(command.module, command.arguments)
    assert (config["model"] if command.module == "train" else config["base"]["model"])["backbone"]


@pytest.mark.parametrize("module, arguments", [
    pytest.param("train", ("--config", "jobs/recipes/abaw5_dtm.yaml", "--sett", "run.epochs=1"), id="flag"),
    pytest.param("infer", ("--checkpoint", "s3://b/run", "--out", "s3://b/out"), id="missing-flag"),
    pytest.param("infer", ("--checkpoint", "s3://b/run", "--shards", "s3://b/s", "--out", "s3://b/o",
                           "--device", "gpu"), id="bad-choice"),
])
def test_a_broken_command_is_rejected(module, arguments):
    with pytest.raises(pytest.fail.Exception, match="rejects its arguments"):
        parsed_arguments(JobCommand("broken", module, arguments))


def test_a_job_that_does_not_exist_is_caught():
    assert not (REPO_ROOT / "jobs" / "ingset.py").is_file()
    with pytest.raises(ModuleNotFoundError):
        parsed_arguments(JobCommand("broken", "ingset", ("ms1mv2",)))


def test_a_config_key_that_does_not_exist_is_rejected():
    with pytest.raises(AssertionError, match="no_such_key"):
        resolved("train", ("--config", "jobs/recipes/abaw5_dtm.yaml", "--set", "scaling.no_such_key=1"))


def unsized_ms1mv2_ingests(commands: list[JobCommand]) -> list[JobCommand]:
    """Our clusters start with no worker: the MS1MV2 reader (the only one `--min-units` cuts) cannot
    take its task count from the CPUs the job sees at start."""
    return [command for command in commands if command.module == "ingest"
            and parsed_arguments(command).source == "ms1mv2" and parsed_arguments(command).min_units is None]


def test_every_ms1mv2_ingest_sizes_its_tasks_for_a_cluster_that_starts_empty():
    assert [command for command in COMMANDS if command.module == "ingest"]
    assert unsized_ms1mv2_ingests(COMMANDS) == []
    unsized = JobCommand("broken", "ingest", ("ms1mv2", "--root", "s3://b/raw", "--out", "s3://b/shards"))
    assert unsized_ms1mv2_ingests([unsized]) == [unsized]


# --------------------------------------------------------------------- pools fit their clusters


@dataclass(frozen=True)
class Bundle:
    cpus: float
    gpus: float
    count: int


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def demand(command: JobCommand) -> Bundle:
    """The resources the command's pool asks Ray for (one bundle shape, `count` times)."""
    if command.module == "train":
        scaling = resolved("train", command.arguments)["scaling"]
        return Bundle(scaling["cpus_per_worker"], 1.0 if scaling["use_gpu"] else 0.0, scaling["num_workers"])
    if command.module == "tune":
        search = resolved("tune", command.arguments)
        scaling = search["base"].get("scaling", {})
        if scaling.get("num_workers", 0) > 0:  # Train workers per trial, beside a light trial function
            return Bundle(scaling.get("cpus_per_worker", 1.0), 1.0 if scaling.get("use_gpu") else 0.0,
                          scaling["num_workers"] * search["concurrency"])
        resources = search["resources_per_trial"]
        return Bundle(resources["cpu"], resources.get("gpu", 0.0), search["concurrency"])
    if command.module in ("infer", "pseudolabel"):
        arguments = parsed_arguments(command)
        gpus = arguments.gpus_per_actor or (1.0 if arguments.device == "cuda" else 0.0)
        return Bundle(arguments.cpus_per_actor, gpus, arguments.actors)
    raise ValueError(f"jobs.{command.module} starts no pool of its own")


def placement_problems(bundle: Bundle, spec: dict[str, Any]) -> list[str]:
    """Whether `bundle.count` bundles fit the worker groups at their maximum size."""
    capacity = 0
    for group in spec["workerGroupSpecs"]:
        limits = ray_container(group)["resources"]["limits"]
        start = group.get("rayStartParams", {})
        cpus = float(start.get("num-cpus", cpu_quantity(limits.get("cpu", 0))))
        gpus = float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        per_pod = math.floor(cpus / bundle.cpus) if bundle.cpus else math.inf
        if bundle.gpus:
            per_pod = min(per_pod, math.floor(gpus / bundle.gpus))
        capacity += group["maxReplicas"] * per_pod
    if capacity < bundle.count:
        return [f"{bundle.count} x ({bundle.cpus:g} CPU, {bundle.gpus:g} GPU): the groups hold {capacity}"]
    return []


POOL_COMMANDS = [(path, command) for path in RAYJOB_FILES
                 for command in job_commands(load(path)["spec"]["entrypoint"], path.name)
                 if command.module in ("train", "tune", "infer", "pseudolabel")]


@pytest.mark.parametrize("path, command", POOL_COMMANDS,
                         ids=[f"{path.name}:{command.module}" for path, command in POOL_COMMANDS])
def test_rayjob_pool_fits_its_cluster(path, command):
    bundle = demand(command)
    assert bundle.count >= 1, bundle
    assert placement_problems(bundle, cluster_spec(load(path))) == []


def test_a_pool_that_cannot_fit_is_caught():
    spec = cluster_spec(load(next(path for path in RAYJOB_FILES if has_gpu_group(load(path)))))
    assert placement_problems(Bundle(cpus=8, gpus=1, count=1), mutated(spec, lambda spec: [
        ray_container(group)["resources"]["limits"].update(cpu="7") for group in spec["workerGroupSpecs"]]))
    assert placement_problems(Bundle(cpus=1, gpus=1, count=99), spec)
    assert placement_problems(Bundle(cpus=1, gpus=0, count=1), spec) == []


# ---------------------------------------------------------------------- data between the jobs


def is_remote(path: str) -> bool:
    return "://" in path


def reads_and_writes(command: JobCommand) -> tuple[list[str], list[str]]:
    """Storage paths a command reads and writes (by its flags and `--set` keys)."""
    settings = command.settings()
    reads = [value for flag in READ_FLAGS for value in command.option(flag)]
    reads += [settings[key] for key in READ_KEYS if key in settings]
    writes = [value for flag in WRITE_FLAGS for value in command.option(flag)]
    writes += [settings[key] for key in WRITE_KEYS if key in settings]
    if command.module == "train" and "run.storage" in settings:
        run = resolved("train", command.arguments)["run"]
        writes.append(f"{settings['run.storage'].rstrip('/')}/{run['name']}")
    return [path for path in reads if is_remote(path)], [path for path in writes if is_remote(path)]


def unproduced_reads(commands: list[JobCommand]) -> list[str]:
    """Remote paths read that no command writes (at or above)."""
    writes = [path.rstrip("/") for command in commands for path in reads_and_writes(command)[1]]
    missing = []
    for command in commands:
        for path in reads_and_writes(command)[0]:
            if not any(path.rstrip("/") == written or path.startswith(written + "/") for written in writes):
                missing.append(f"{command.source}: jobs.{command.module} reads {path}")
    return missing


def test_every_path_a_command_reads_is_written_by_another():
    assert unproduced_reads(COMMANDS) == []


def test_a_read_nothing_writes_is_caught():
    train = next(command for command in COMMANDS if command.module == "train" and command.source in
                 {path.name for path in RAYJOB_FILES})
    broken = JobCommand(train.source, "train", tuple(word.replace("/split", "/splits")
                                                     if word.startswith("data.split=") else word
                                                     for word in train.arguments))
    assert unproduced_reads([command for command in COMMANDS if command != train] + [broken]) == [
        f"{train.source}: jobs.train reads {broken.settings()['data.split']}"]


def unbaked_backbones(commands: list[JobCommand], dockerfile: str) -> set[str]:
    """Backbones the runs start from pretrained weights that the image does not hold: with
    HF_HUB_OFFLINE=1 in every pod, such a run fails at its start."""
    [default] = re.findall(r'^ARG PRETRAINED_MODELS="([^"]*)"', dockerfile, re.M)
    models = [resolved("train", command.arguments)["model"]
              for command in commands if command.module == "train"]
    models += [resolved("tune", command.arguments)["base"]["model"]
               for command in commands if command.module == "tune"]
    return {model["backbone"] for model in models if model.get("pretrained")} - set(default.split())


def test_pretrained_backbones_of_cluster_runs_are_baked_into_the_image():
    assert [command for command in COMMANDS if command.module in ("train", "tune")]
    assert unbaked_backbones(COMMANDS, DOCKERFILE.read_text()) == set()
    leaner_image = DOCKERFILE.read_text().replace('"tf_efficientnet_b7 ', '"')
    assert unbaked_backbones(COMMANDS, leaner_image) == {"tf_efficientnet_b7"}


