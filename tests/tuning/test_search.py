"""The typed search file: unknown keys and bad distributions fail with the key named, `base.<path>`
overrides reach the recipe, and every searched value is checked against the recipe before a trial."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.training.config import load_config
from pipeline.tuning.search import load_search

RECIPE = {
    "method": "dtm",
    "model": {"backbone": "test_resnet"},
    "data": {"split": "some/split", "image_size": 32},
    "run": {"steps_per_epoch": 3},
}


def search_mapping(**changes):
    mapping = {
        "base": RECIPE,
        "name": "unit",
        "storage": "tune_runs",
        "trials": 4,
        "epochs": 3,
        "space": [
            {"key": "method_options.threshold_momentum", "distribution": "one_minus_loguniform",
             "low": 0.5, "high": 0.99},
            {"key": "optimizer.lr", "distribution": "loguniform", "low": 1e-4, "high": 1e-2},
            {"key": "method_options.initial_threshold", "distribution": "uniform", "low": 0.5, "high": 0.95},
        ],
    }
    mapping.update(changes)
    return mapping


def test_a_valid_search_resolves_its_base():
    search = load_search(mapping=search_mapping())
    assert search.base_config.method == "dtm"
    assert search.base_config.run.epochs == 3  # the search's epochs per trial
    assert search.base["data"]["split"].endswith("/some/split")  # absolute: trials run elsewhere
    assert [entry.name for entry in search.config.space] == [
        "1-method_options.threshold_momentum", "optimizer.lr", "method_options.initial_threshold"]
    assert search.grace_period == 1


def test_a_trial_rebuilding_the_search_elsewhere_finds_the_same_experiment(tmp_path, monkeypatch):
    """Tune runs each trial in its own working folder, where the trial rebuilds the search from
    its manifest: a relative storage must not move the trial's files there (it did: the Trainer's
    records of a `jobs/tune/demo_dtm.yaml` search landed under Ray's session folder)."""
    monkeypatch.chdir(tmp_path)
    search = load_search(mapping=search_mapping(storage="relative/tune"))
    experiment = str(tmp_path / "relative" / "tune" / "unit")
    assert search.experiment == experiment
    (tmp_path / "trial_folder").mkdir()
    monkeypatch.chdir(tmp_path / "trial_folder")
    assert search.experiment == experiment
    assert load_search(mapping=search.manifest()).experiment == experiment
    assert load_search(mapping=search.manifest()).base["data"]["split"] == str(tmp_path / "some" / "split")


def test_one_minus_loguniform_samples_one_minus_x():
    search = load_search(mapping=search_mapping())
    entry = search.config.space[0]
    assert entry.sampled_bounds() == pytest.approx((0.01, 0.5))
    config = search.trial_config({"1-method_options.threshold_momentum": 0.01, "optimizer.lr": 1e-3,
                                  "method_options.initial_threshold": 0.7}, run_name="trial_x")
    assert config.options().threshold_momentum == pytest.approx(0.99)
    assert config.optimizer.lr == 1e-3 and config.run.name == "trial_x"


def test_an_unknown_search_key_is_named():
    with pytest.raises(ConfigError, match=r"^trails: unknown key"):
        load_search(mapping=search_mapping(trails=3))


def test_an_unknown_recipe_key_in_the_space_is_named():
    space = search_mapping()["space"] + [{"key": "optimizer.learning_rate", "distribution": "uniform",
                                          "low": 0.1, "high": 0.2}]
    with pytest.raises(ConfigError, match=r"space\[3\]\.key: optimizer\.learning_rate: unknown key "
                                          r"'learning_rate' in optimizer"):
        load_search(mapping=search_mapping(space=space))
    with pytest.raises(ConfigError, match=r"space\[0\]\.key: method_options\.momentum: unknown key"):
        load_search(mapping=search_mapping(space=[{"key": "method_options.momentum",
                                                   "distribution": "uniform", "low": 0.1, "high": 0.2}]))
    with pytest.raises(ConfigError, match=r"space\[0\]\.key: optimizer is a section"):
        load_search(mapping=search_mapping(space=[{"key": "optimizer", "distribution": "choice",
                                                   "values": [1]}]))


@pytest.mark.parametrize("entry, message", [
    ({"key": "optimizer.lr", "distribution": "gaussian", "low": 0.1, "high": 0.2},
     r"space\[0\]\.distribution: one of"),
    ({"key": "optimizer.lr", "distribution": "loguniform", "low": 0.0, "high": 0.2},
     r"space\[0\]\.low: must be positive"),
    ({"key": "optimizer.lr", "distribution": "uniform", "low": 0.3, "high": 0.2},
     r"space\[0\]\.high: must be above low"),
    ({"key": "method_options.ema_decay", "distribution": "one_minus_loguniform", "low": 0.9, "high": 1.0},
     r"space\[0\]\.high: must be below 1"),
    ({"key": "optimizer.lr", "distribution": "choice", "values": []},
     r"space\[0\]\.values: choice needs"),
    ({"key": "optimizer.lr", "distribution": "grid", "values": [0.1, 0.2]},
     r"space\[0\]\.distribution: grid values cannot go into an Optuna space"),
])
def test_a_bad_distribution_is_named(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_search(mapping=search_mapping(space=[entry]))


def test_values_the_recipe_rejects_fail_before_any_trial():
    # The method's own options check: initial_threshold must lie in [0, 1].
    entry = {"key": "method_options.initial_threshold", "distribution": "uniform", "low": 0.5, "high": 1.5}
    with pytest.raises(ConfigError, match=r"space\[0\] method_options\.initial_threshold=1\.5: the recipe "
                                          r"rejects it: .*initial_threshold must lie in \[0, 1\]"):
        load_search(mapping=search_mapping(space=[entry]))
    entry = {"key": "optimizer.name", "distribution": "choice", "values": ["adam", "lion"]}
    with pytest.raises(ConfigError, match=r"optimizer\.name='lion': the recipe rejects it"):
        load_search(mapping=search_mapping(space=[entry]))
    entry = {"key": "data.labeled_batch", "distribution": "uniform", "low": 8.5, "high": 16}
    with pytest.raises(ConfigError, match=r"data\.labeled_batch is an integer key"):
        load_search(mapping=search_mapping(space=[entry]))


def test_integer_keys_are_sampled_as_integers():
    entry = {"key": "data.labeled_batch", "distribution": "uniform", "low": 8, "high": 16}
    search = load_search(mapping=search_mapping(space=[entry]))
    assert search.trial_config({"data.labeled_batch": 11.6}).data.labeled_batch == 12


def test_base_overrides_reach_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    search_file = tmp_path / "search.yaml"
    search_file.write_text(yaml.safe_dump(search_mapping(base=str(recipe))))
    search = load_search(str(search_file), ["base.data.split=/data/split", "base.method_options.ema_decay=0.95",
                                            "trials=7", "space.1.high=0.05"])
    assert search.base_config.data.split == "/data/split"
    assert search.base_config.options().ema_decay == 0.95
    assert search.config.trials == 7 and search.config.space[1].high == 0.05
    with pytest.raises(ConfigError, match=r"^base\.data\.image_sise: unknown key"):
        load_search(str(search_file), ["base.data.image_sise=64"])
    with pytest.raises(ConfigError, match=r"^base\.optimizer\.lr: expected a number"):
        load_search(str(search_file), ["base.optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"--set space\.9\.high=0\.05: space has no item 9"):
        load_search(str(search_file), ["space.9.high=0.05"])


def test_budget_scheduler_and_objective_are_checked():
    with pytest.raises(ConfigError, match=r"^scheduler\.grace_period: must be at most epochs"):
        load_search(mapping=search_mapping(scheduler={"grace_period": 5}))
    warm = dict(RECIPE, optimizer={"warmup_steps": 7})  # 7 steps of 3 per epoch: 3 epochs of warm-up
    with pytest.raises(ConfigError, match=r"^scheduler\.grace_period: must be at least the warm-up \(3"):
        load_search(mapping=search_mapping(base=warm, scheduler={"grace_period": 2}))
    assert load_search(mapping=search_mapping(base=warm)).grace_period == 3
    with pytest.raises(ConfigError, match=r"^objective\.metric: one of"):
        load_search(mapping=search_mapping(objective={"metric": "macro_f1"}))
    assert load_search(mapping=search_mapping(
        objective={"metric": "best_selection_macro_f1_smoothed_10"})).config.objective.metric.endswith("_10")
    workers = dict(RECIPE, scaling={"num_workers": 2})
    assert load_search(mapping=search_mapping(base=workers)).base_config.scaling.num_workers == 2
    with pytest.raises(ConfigError, match=r"^resources_per_trial\.gpu: must be 0 with base\.scaling"):
        load_search(mapping=search_mapping(base=workers, resources_per_trial={"cpu": 0.2, "gpu": 1}))
    with pytest.raises(ConfigError, match=r"^base\.run\.resume: must be true"):
        load_search(mapping=search_mapping(base=dict(workers, run={"resume": False})))
    with pytest.raises(ConfigError, match=r"^base\.data\.split: set it"):
        load_search(mapping=search_mapping(base=dict(RECIPE, data={"image_size": 32})))


def test_grid_search_needs_grid_entries_and_their_count():
    grid = [{"key": "optimizer.lr", "distribution": "grid", "values": [1e-3, 1e-2]},
            {"key": "method_options.unlabeled_weight", "distribution": "grid", "values": [0.5, 1.0, 2.0]}]
    assert load_search(mapping=search_mapping(searcher="grid", trials=6, space=grid)).config.trials == 6
    with pytest.raises(ConfigError, match=r"^trials: a grid search runs each of the 6"):
        load_search(mapping=search_mapping(searcher="grid", trials=4, space=grid))
    mixed = grid[:1] + [{"key": "optimizer.weight_decay", "distribution": "uniform", "low": 0, "high": 0.1}]
    with pytest.raises(ConfigError, match=r"space\[1\]\.distribution: searcher grid needs"):
        load_search(mapping=search_mapping(searcher="grid", trials=2, space=mixed))
    assert load_search(mapping=search_mapping(searcher="random", space=mixed)).config.searcher == "random"


@pytest.mark.parametrize("name", ["demo_dtm.yaml", "abaw5_dtm.yaml"])
def test_the_shipped_search_files_load(name):
    search = load_search(f"jobs/tune/{name}", ["base.data.split=/data/split"])
    assert {entry.key for entry in search.config.space} >= {
        "method_options.threshold_momentum", "method_options.unlabeled_weight",
        "method_options.initial_threshold", "optimizer.lr", "method_options.ema_decay"}
    assert search.entry("1-method_options.ema_decay").distribution == "one_minus_loguniform"
    load_config(base=search.trial_mapping({entry.name: entry.sampled_bounds()[0]
                                           for entry in search.config.space}))
