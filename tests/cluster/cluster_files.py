"""What the tests of `cluster/` share: the cluster files found by their kind, the parts of a
KubeRay cluster spec, and the `python -m jobs...` commands the files and the READMEs give."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
CLUSTER_README = CLUSTER / "README.md"
MAIN_README = REPO_ROOT / "README.md"
MAIN_README_SECTION = "## Running on a cluster"
"""The main README's section on clusters (its commands are checked like cluster/README.md's)."""
IMAGE_NAME = "fer-pseudolabel"
JOBS_ON_KUBERAY = {"ingest", "train", "tune", "infer", "pseudolabel"}
"""The jobs a user can run as a RayJob (issue 14); more may come, none may go."""


def load(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def project() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def pinned_ray_version() -> str:
    pins = [re.fullmatch(r"ray\[[^\]]*\]==(\S+)", dependency) for dependency in project()["dependencies"]]
    [version] = [pin.group(1) for pin in pins if pin]
    return version


def image_problem(image: str) -> str | None:
    """The project image is `<your registry>/fer-pseudolabel:<pyproject version>`."""
    registry, _, rest = image.rpartition("/")
    if rest != f"{IMAGE_NAME}:{project()['version']}" or not registry:
        return f"image {image}: want <registry>/{IMAGE_NAME}:{project()['version']}"
    return None


def mutated(document: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    broken = copy.deepcopy(document)
    change(broken)
    return broken


def rename_key(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def kind_of(document: Any) -> str:
    if isinstance(document, dict) and document.get("apiVersion") == "ray.io/v1":
        return str(document.get("kind"))
    if isinstance(document, dict) and isinstance(document.get("provider"), dict) \
            and "available_node_types" in document:
        return "launcher"
    return "unknown"


YAML_FILES = sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml")])
KINDS = {path: kind_of(load(path)) for path in YAML_FILES}
LAUNCHER_FILES = [path for path, kind in KINDS.items() if kind == "launcher"]
RAYCLUSTER_FILES = [path for path, kind in KINDS.items() if kind == "RayCluster"]
RAYJOB_FILES = [path for path, kind in KINDS.items() if kind == "RayJob"]
KUBERAY_FILES = RAYCLUSTER_FILES + RAYJOB_FILES


def file_id(path: Path) -> str:
    return path.name


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [(group["groupName"], group)
                                               for group in spec["workerGroupSpecs"]]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def gpus_of(group: dict[str, Any]) -> float:
    return float(ray_container(group)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


@dataclass(frozen=True)
class JobCommand:
    source: str
    module: str
    """The job's name: `train` for `python -m jobs.train`."""
    arguments: tuple[str, ...]

    def option(self, flag: str) -> list[str]:
        """The values after `flag` (every occurrence, multi-valued flags included)."""
        values, taking = [], False
        for word in self.arguments:
            if word.startswith("--"):
                taking = word == flag
            elif taking:
                values.append(word)
        return values

    def settings(self) -> dict[str, str]:
        """`--set key=value` pairs, the later winning."""
        return dict(value.split("=", 1) for value in self.option("--set"))


def job_commands(text: str, source: str = "") -> list[JobCommand]:
    """Every `python -m jobs.<name> ...` command in shell text: continued lines joined, each
    command ending at a comment or a shell operator."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        for match in re.finditer(r"python -m jobs\.(\w+)", line):
            lexer = shlex.shlex(line[match.end():], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = []
            for word in lexer:
                if word in ("&&", "||", ";", "|", "&", ")"):
                    break
                words.append(word)
            commands.append(JobCommand(source, match.group(1), tuple(words)))
    return commands


def code_lines(markdown: str) -> str:
    """The lines of a Markdown text's code: fenced blocks and lines indented 4 spaces."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            lines.append(line)
    return "\n".join(lines)


def main_readme_section() -> str:
    text = MAIN_README.read_text()
    start = text.index(MAIN_README_SECTION)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def with_data_root(commands: list[JobCommand], code: str) -> list[JobCommand]:
    """README commands say `$DATA/...`: one copy of each per value the README gives DATA."""
    roots = sorted(set(re.findall(r"\bDATA=(\S+)", code)))
    result = []
    for command in commands:
        if not any("$DATA" in word for word in command.arguments):
            result.append(command)
            continue
        if not roots:
            raise ValueError(f"{command.source}: jobs.{command.module} uses $DATA, which the text never sets")
        result += [JobCommand(command.source, command.module,
                              tuple(word.replace("$DATA", root) for word in command.arguments))
                   for root in roots]
    return result


def readme_commands(markdown: str, source: str) -> list[JobCommand]:
    code = code_lines(markdown)
    return with_data_root(job_commands(code, source), code)


def all_commands() -> list[JobCommand]:
    """Every job command of the cluster files and of both READMEs' cluster instructions."""
    commands = [command for path in RAYJOB_FILES
                for command in job_commands(load(path)["spec"]["entrypoint"], path.name)]
    commands += readme_commands(CLUSTER_README.read_text(), CLUSTER_README.name)
    commands += readme_commands(main_readme_section(), "README.md")
    return commands


def has_gpu_group(manifest: dict[str, Any]) -> bool:
    return any(gpus_of(group) for group in cluster_spec(manifest)["workerGroupSpecs"])
