"""The typed search file of `jobs.tune`: a base recipe, the keys to search with their distributions,
the budget, the objective and the searcher, all checked against the typed `TrainConfig` before any
trial starts.

    base: jobs/recipes/abaw5_dtm.yaml        # a recipe path, or the recipe inline as a mapping
    name: abaw5_dtm_search                   # the experiment folder: <storage>/<name>/
    storage: runs/tune                       # local or s3://
    trials: 40
    epochs: 10                               # per trial (replaces the recipe's run.epochs)
    concurrency: 2
    resources_per_trial: {cpu: 4, gpu: 1}
    searcher: optuna                         # optuna (TPE) | random | grid
    seed: 0
    objective: {metric: best_selection_macro_f1, mode: max}
    scheduler: {name: asha, grace_period: 2, reduction_factor: 3}
    space:
      - {key: method_options.threshold_momentum, distribution: one_minus_loguniform, low: 0.5, high: 0.99}
      - {key: optimizer.lr, distribution: loguniform, low: 1.0e-4, high: 3.0e-3}

A search may also name `variants`: whole recipes (paths or inline mappings) that a grid entry with
key `variant` chooses between, every other entry applying to each (jobs.ablate runs a paper's table
rows x seeds this way: `space: [{key: variant, distribution: grid, values: [...]},
{key: run.seed, distribution: grid, values: [0, 1]}]`). `base` is then the first variant's recipe
(what `--set base.<path>` and the report's defaults see); `--set base.<path>` applies to every
variant.

`--set` overrides any key of this file (`--set trials=4`, `--set space.0.high=0.999`) and, as
`base.<path>`, any key of the recipe (`--set base.data.split=s3://bucket/split`). Pure Python: the
Ray side is `ray_tune.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import config as typed
from pipeline.config import ConfigError
from pipeline.data import storage
from pipeline.training.config import TrainConfig, load_config, parse_override, to_mapping

DISTRIBUTIONS = ("uniform", "loguniform", "one_minus_loguniform", "choice", "grid")
SEARCHERS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "fifo")
OBJECTIVE = "best_selection_macro_f1"
"""The default objective: the best validation macro-F1 on the selection half so far in the trial
(a best-so-far figure, so a trial that ASHA stops is scored by its best epoch, not its last)."""
SMOOTHED_OBJECTIVE_PREFIX = "best_selection_macro_f1_smoothed_"
MANIFEST = "search.yaml"
"""The resolved search (with its base recipe inline) in the experiment folder: what the report reads."""
VARIANT = "variant"
"""The reserved space key that picks one of the search's `variants` (a whole recipe) per trial."""
TIME_ATTRIBUTE = "epoch"
"""ASHA's clock: an explicit epoch metric (Tune's training_iteration restarts for restored trials)."""


@dataclass
class SearchEntry:
    key: str
    """A recipe key by its path, e.g. optimizer.lr or method_options.unlabeled_weight."""
    distribution: str
    """uniform | loguniform | one_minus_loguniform (1 - x sampled log-uniformly: for EMA decays
    and momenta near 1) | choice | grid (every value, with searcher random or grid)."""
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    """The values of a choice or grid entry."""

    @property
    def name(self) -> str:
        """The searched variable's name (what the searcher and the report's plots see)."""
        return f"1-{self.key}" if self.distribution == "one_minus_loguniform" else self.key

    def sampled_bounds(self) -> tuple[float, float]:
        """The range the searcher samples (for one_minus_loguniform: the range of 1 - x)."""
        assert self.low is not None and self.high is not None
        if self.distribution == "one_minus_loguniform":
            return 1.0 - self.high, 1.0 - self.low
        return self.low, self.high

    def to_recipe_value(self, sampled: Any, integer: bool = False) -> Any:
        """The recipe value of a sampled one."""
        if self.distribution == "one_minus_loguniform":
            return 1.0 - float(sampled)
        if integer and self.distribution in ("uniform", "loguniform"):
            return int(round(float(sampled)))
        return sampled


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        typed.check(self.cpu > 0, "resources_per_trial.cpu", "must be positive")
        typed.check(self.gpu >= 0, "resources_per_trial.gpu", "must be >= 0")


@dataclass
class Objective:
    metric: str = OBJECTIVE
    """best_selection_macro_f1, or best_selection_macro_f1_smoothed_<window> for a window of the
    recipe's evaluation.windows. Both are on the selection half of the validation videos; the
    report half is looked at for the best trial only."""
    mode: str = "max"

    def __post_init__(self) -> None:
        typed.check(self.mode == "max", "objective.mode", "max (macro-F1 is maximised)")


@dataclass
class SchedulerConfig:
    name: str = "asha"
    """asha (stops the weaker trials at each rung) or fifo (every trial runs all its epochs)."""
    grace_period: int | None = None
    """Epochs before ASHA may stop a trial; None: the method's warm-up, at least 1 epoch. Never
    shorter than the warm-up (optimizer.warmup_steps in epochs)."""
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        typed.check(self.name in SCHEDULERS, "scheduler.name", f"one of {list(SCHEDULERS)}")
        typed.check(self.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
        typed.check(self.grace_period is None or self.grace_period >= 1, "scheduler.grace_period",
                    "must be at least 1")


@dataclass
class SearchConfig:
    base: str | dict[str, Any] = ""
    """The recipe: a path to a recipe YAML or the recipe inline."""
    name: str = "search"
    storage: str = "runs/tune"
    trials: int = 8
    epochs: int = 2
    """Epochs per trial (replaces the recipe's run.epochs); ASHA's max_t."""
    concurrency: int = 1
    resources_per_trial: Resources = field(default_factory=Resources)
    """The trial process's CPUs and GPU. With base.scaling.num_workers > 0 only the function that
    launches the TorchTrainer (a fraction of a CPU, no GPU); the workers take
    base.scaling.cpus_per_worker (and use_gpu) each."""
    searcher: str = "optuna"
    seed: int = 0
    objective: Objective = field(default_factory=Objective)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    space: list[SearchEntry] = field(default_factory=list)
    checkpoints_to_keep: int = 1
    """Tune checkpoints kept per trial (the full SSL state each)."""
    variants: dict[str, Any] = field(default_factory=dict)
    """Named recipes (paths or inline mappings) chosen per trial by a `variant` grid/choice entry
    of the space; each is prepared and checked like `base` (run.epochs = epochs, absolute paths)."""

    def __post_init__(self) -> None:
        typed.check(bool(self.base), "base", "set it to a recipe path or an inline recipe")
        typed.check(bool(self.name) and "/" not in self.name, "name", "a folder name (no '/')")
        typed.check(self.trials >= 1, "trials", "must be at least 1")
        typed.check(self.epochs >= 1, "epochs", "must be at least 1")
        typed.check(self.concurrency >= 1, "concurrency", "must be at least 1")
        typed.check(self.searcher in SEARCHERS, "searcher", f"one of {list(SEARCHERS)}")
        typed.check(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be at least 1")
        typed.check(bool(self.space), "space", "name at least one key to search")


@dataclass
class Search:
    """A validated search: its typed file, the base recipe (a mapping with run.epochs = epochs and
    absolute paths) and the typed base config."""

    config: SearchConfig
    base: dict[str, Any]
    base_config: TrainConfig
    integer_keys: frozenset[str]
    """Keys of integer recipe fields (their uniform/loguniform samples are rounded)."""
    variant_bases: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The prepared recipe of each variant (as `base`), by variant name."""

    @property
    def experiment(self) -> str:
        """The experiment folder: `<storage>/<name>` (`load_search` made a local storage absolute)."""
        return storage.join(self.config.storage, self.config.name)

    @property
    def grace_period(self) -> int:
        return self.config.scheduler.grace_period or max(1, warmup_epochs(self.base_config))

    def entry(self, name: str) -> SearchEntry:
        return next(entry for entry in self.config.space if entry.name == name)

    def recipe_values(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sampled values by variable name -> recipe values by key path."""
        return {entry.key: entry.to_recipe_value(params[entry.name], entry.key in self.integer_keys)
                for entry in self.config.space if entry.name in params and entry.key != VARIANT}

    def trial_mapping(self, params: dict[str, Any], run_storage: str | None = None,
                      run_name: str | None = None) -> dict[str, Any]:
        """The recipe of one trial (a plain mapping that `load_config(base=...)` accepts)."""
        variant = params.get(VARIANT)
        mapping = copy.deepcopy(self.variant_bases[variant] if variant is not None else self.base)
        for key, value in self.recipe_values(params).items():
            set_path(mapping, key.split("."), value)
        run = mapping.setdefault("run", {})
        if run_storage is not None:
            run["storage"] = run_storage
        if run_name is not None:
            run["name"] = run_name
        return mapping

    def trial_config(self, params: dict[str, Any], run_storage: str | None = None,
                     run_name: str | None = None) -> TrainConfig:
        return load_config(base=self.trial_mapping(params, run_storage, run_name))

    def manifest(self) -> dict[str, Any]:
        """The resolved search, base recipe inline: written to the experiment folder."""
        mapping = dataclasses.asdict(self.config)
        mapping["base"] = copy.deepcopy(self.base)
        if self.variant_bases:
            mapping["variants"] = copy.deepcopy(self.variant_bases)
        return mapping


# ------------------------------------------------------------------------------------ loading

def load_search(path: str | None = None, overrides: list[str] | None = None,
                mapping: dict[str, Any] | None = None) -> Search:
    """A search file (or `mapping`) + `--set` overrides -> a validated Search. Every error is a
    ConfigError that starts with the key's path (`space[2].key`, `base.optimizer.lr`, ...)."""
    data: dict[str, Any] = copy.deepcopy(mapping) if mapping is not None else {}
    if path:
        with open(path) as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a search file must be a mapping")
        data.update(loaded)
    base_overrides = []
    for override in overrides or []:
        keys, value = parse_override(override)
        if keys[0] == "base" and len(keys) > 1:
            base_overrides.append((keys[1:], value))
        else:
            set_path(data, keys, value, f"--set {override}")
    config = typed.from_mapping(SearchConfig, data)
    # Trials run in their own working folders (Tune changes into them) and rebuild the search from
    # its manifest there: a relative local storage would put their files inside those folders.
    config = dataclasses.replace(config, storage=storage.absolute(config.storage))
    base = _base_mapping(config.base)
    variants = {name: _base_mapping(recipe) for name, recipe in config.variants.items()}
    for keys, value in base_overrides:
        for recipe in (base, *variants.values()):
            set_path(recipe, keys, value, "base." + ".".join(keys))
    return validate(config, base, variants)


def _base_mapping(base: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    try:
        with open(base) as handle:
            loaded = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"base: no recipe file {base!r}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"base: {base} is not a recipe mapping")
    return loaded


def validate(config: SearchConfig, base: dict[str, Any],
             variants: dict[str, dict[str, Any]] | None = None) -> Search:
    base, base_config = _prepare_recipe(config, base, "base")
    variants = variants or {}
    prepared = {name: _prepare_recipe(config, recipe, f"variants.{name}") for name, recipe in variants.items()}
    variant_entries = [entry for entry in config.space if entry.key == VARIANT]
    if variants or variant_entries:
        typed.check(bool(variants), "variants", "a `variant` entry needs named recipes in `variants`")
        typed.check(len(variant_entries) == 1, "space", f"exactly one entry with key {VARIANT!r}")
        entry = variant_entries[0]
        typed.check(entry.distribution in ("grid", "choice") and bool(entry.values), "space.variant",
                    "a grid or choice over variant names")
        unknown = [value for value in entry.values or [] if value not in variants]
        typed.check(not unknown, "space.variant", f"unknown variants {unknown} (known: {list(variants)})")
    recipes = [(where, recipe, recipe_config) for where, (recipe, recipe_config) in
               [("base", (base, base_config))] + [(f"variants.{name}", value) for name, value in prepared.items()]]
    for where, _, recipe_config in recipes:
        _check_recipe(config, recipe_config, where)

    integer_keys = set()
    seen: set[str] = set()
    for index, entry in enumerate(config.space):
        where = f"space[{index}]"
        typed.check(entry.key not in seen, f"{where}.key", f"{entry.key} is searched twice")
        seen.add(entry.key)
        if entry.key == VARIANT:
            _check_searcher(config.searcher, entry, where)
            continue
        hints = [resolve_key(recipe_config, entry.key, f"{where}.key") for _, _, recipe_config in recipes]
        integer = _is_integer(hints[0])
        if integer:
            integer_keys.add(entry.key)
        _check_distribution(entry, where, integer)
        _check_searcher(config.searcher, entry, where)
        for label, recipe, _ in recipes:
            for value in _probe_values(entry, integer):
                mapping = copy.deepcopy(recipe)
                set_path(mapping, entry.key.split("."), value)
                try:
                    _load_base(mapping)
                except ConfigError as error:
                    shown = "" if label == "base" else f" ({label})"
                    raise ConfigError(f"{where} {entry.key}={value!r}: the recipe{shown} rejects it: "
                                      f"{error}") from None
    if config.searcher == "grid":
        combinations = math.prod(len(entry.values or []) for entry in config.space)
        typed.check(config.trials == combinations, "trials",
                    f"a grid search runs each of the {combinations} combinations once: set trials "
                    f"to {combinations}")
    search = Search(config, base, base_config, frozenset(integer_keys),
                    {name: recipe for name, (recipe, _) in prepared.items()})
    warmup = max(warmup_epochs(recipe_config) for _, _, recipe_config in recipes)
    if config.scheduler.name == "asha":
        typed.check(search.grace_period >= warmup, "scheduler.grace_period",
                    f"must be at least the warm-up ({warmup} epochs of optimizer.warmup_steps)")
        typed.check(search.grace_period <= config.epochs, "scheduler.grace_period",
                    f"must be at most epochs ({config.epochs})")
    return search


def _prepare_recipe(config: SearchConfig, recipe: dict[str, Any], where: str) -> tuple[dict[str, Any], TrainConfig]:
    """A recipe of the search with run.epochs = epochs and absolute local paths, and its typed config."""
    recipe = copy.deepcopy(recipe)
    recipe.setdefault("run", {})
    if not isinstance(recipe["run"], dict):
        raise ConfigError(f"{where}.run: expected a mapping")
    recipe["run"]["epochs"] = config.epochs
    loaded = _load_recipe(recipe, where)
    _absolute_paths(recipe, loaded)
    return recipe, _load_recipe(recipe, where)


def _load_recipe(mapping: dict[str, Any], where: str) -> TrainConfig:
    try:
        return load_config(base=mapping)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None


def _check_recipe(config: SearchConfig, base_config: TrainConfig, where: str) -> None:
    typed.check(bool(base_config.data.split), f"{where}.data.split",
                "set it to a jobs.split output folder (--set base.data.split=<dir or s3://...>)")
    if base_config.scaling.num_workers > 0:
        # The trial function only launches the TorchTrainer: its workers reserve the CPUs and GPUs.
        typed.check(config.resources_per_trial.gpu == 0, "resources_per_trial.gpu",
                    "must be 0 with base.scaling.num_workers > 0: the Train workers take the GPUs "
                    "(base.scaling.use_gpu); the trial function would hold one idle")
        typed.check(base_config.run.resume, f"{where}.run.resume",
                    "must be true with Ray Train workers (a trial resumes its Train run by name)")
    typed.check(base_config.evaluation.every_epochs == 1, f"{where}.evaluation.every_epochs",
                "must be 1 in a search: the objective and ASHA read validation every epoch")
    windows = [str(window) for window in base_config.evaluation.windows]
    allowed = [OBJECTIVE] + [SMOOTHED_OBJECTIVE_PREFIX + window for window in windows]
    typed.check(config.objective.metric in allowed, "objective.metric", f"one of {allowed}")


def _is_integer(hint: Any) -> bool:
    if hint is int:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [option for option in typing.get_args(hint) if option is not type(None)] == [int]
    return False


def _load_base(mapping: dict[str, Any]) -> TrainConfig:
    try:
        return load_config(base=mapping)
    except ConfigError as error:
        raise ConfigError(f"base.{error}") from None


def _absolute_paths(base: dict[str, Any], config: TrainConfig) -> None:
    """Trials run in their own working folders: make the recipe's local paths absolute."""
    data = base.setdefault("data", {})
    if config.data.split:
        data["split"] = storage.absolute(config.data.split)
    if config.data.labeled_pseudo_labels:
        data["labeled_pseudo_labels"] = storage.absolute(config.data.labeled_pseudo_labels)
    if config.model.pretrained_path:
        base.setdefault("model", {})["pretrained_path"] = storage.absolute(config.model.pretrained_path)
    base.setdefault("run", {})["storage"] = storage.absolute(config.run.storage)


def warmup_epochs(config: TrainConfig) -> int:
    """The learning-rate warm-up in whole epochs (ASHA's grace period is never shorter)."""
    return math.ceil(config.optimizer.warmup_steps / config.run.steps_per_epoch)


def resolve_key(config: TrainConfig, key: str, where: str) -> Any:
    """The type hint of recipe key `key` (dotted path), or a ConfigError naming it."""
    parts = key.split(".")
    node: Any = type(config)
    walked: list[str] = []
    for depth, part in enumerate(parts):
        if node is TrainConfig and part == "method_options":
            if depth == len(parts) - 1:
                raise ConfigError(f"{where}: {key} is a section, not a value")
            node = config.method_class().Options
            walked.append(part)
            continue
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{where}: {key}: {'.'.join(walked)} is a value, not a section")
        hints = typing.get_type_hints(node)
        names = [item.name for item in dataclasses.fields(node) if item.init]
        if part not in names:
            section = ".".join(walked) or "the recipe"
            raise ConfigError(f"{where}: {key}: unknown key {part!r} in {section} (known: {', '.join(names)})")
        node = hints[part]
        walked.append(part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"{where}: {key} is a section, not a value")
    return node


def _check_distribution(entry: SearchEntry, where: str, integer: bool) -> None:
    kind = entry.distribution
    typed.check(kind in DISTRIBUTIONS, f"{where}.distribution", f"one of {list(DISTRIBUTIONS)}, got {kind!r}")
    if kind in ("choice", "grid"):
        typed.check(bool(entry.values), f"{where}.values", f"{kind} needs a non-empty list of values")
        typed.check(entry.low is None and entry.high is None, f"{where}.low",
                    f"{kind} takes values, not low/high")
        return
    typed.check(entry.values is None, f"{where}.values", f"{kind} takes low and high, not values")
    typed.check(entry.low is not None and entry.high is not None, f"{where}.low", f"{kind} needs low and high")
    assert entry.low is not None and entry.high is not None
    typed.check(entry.low < entry.high, f"{where}.high", f"must be above low ({entry.low})")
    if kind == "loguniform":
        typed.check(entry.low > 0, f"{where}.low", "must be positive for loguniform")
    if kind == "one_minus_loguniform":
        typed.check(entry.high < 1, f"{where}.high", "must be below 1 (1 - x is sampled on a log scale)")
        typed.check(not integer, f"{where}.distribution", f"{entry.key} is an integer key")
    if integer:
        typed.check(float(entry.low).is_integer() and float(entry.high).is_integer(), f"{where}.low",
                    f"{entry.key} is an integer key: low and high must be integers")


def _check_searcher(searcher: str, entry: SearchEntry, where: str) -> None:
    if searcher == "optuna":
        typed.check(entry.distribution != "grid", f"{where}.distribution",
                    "grid values cannot go into an Optuna space: use choice, or searcher grid/random")
    if searcher == "grid":
        typed.check(entry.distribution == "grid", f"{where}.distribution",
                    "searcher grid needs every entry to be a grid (or use searcher random)")


def _probe_values(entry: SearchEntry, integer: bool) -> list[Any]:
    """Values checked against the recipe before any trial: the range's ends or every value."""
    if entry.distribution in ("choice", "grid"):
        return list(entry.values or [])
    assert entry.low is not None and entry.high is not None
    if integer:
        return [int(entry.low), int(entry.high)]
    return [float(entry.low), float(entry.high)]


def set_path(mapping: dict[str, Any], keys: list[str], value: Any, override: str | None = None) -> None:
    """Set `a.b.c` in nested mappings; an integer part indexes a list (`space.0.high`)."""
    node: Any = mapping
    label = override or ".".join(keys)
    for position, part in enumerate(keys):
        last = position == len(keys) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{label}: {'.'.join(keys[:position]) or part} has no item {part}")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {'.'.join(keys[:position])} is not a section")
        if last:
            node[part] = value
            return
        node = node.setdefault(part, {})


def trial_dirname(trial_id: str) -> str:
    """A trial's folder in the experiment: from its id only (no parameters, no timestamps), so a
    restored experiment finds it again."""
    return f"trial_{trial_id}"


def dump_yaml(mapping: dict[str, Any]) -> str:
    return yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None)


def config_mapping(config: TrainConfig) -> dict[str, Any]:
    return to_mapping(config)
