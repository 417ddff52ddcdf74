"""The single-process trainer end to end on the tiny demo corpus: metrics files, checkpoints,
exact resume, threshold updates and config errors."""

from __future__ import annotations

import json
import re
import os
import threading

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import f1_score
from torch.overrides import TorchFunctionMode

from jobs import train as train_job
from pipeline.data import schema
from pipeline.methods.base import MethodContext
from pipeline.training import checkpoint
from pipeline.training.config import load_config
from pipeline.training.data import UnlabeledStream, read_labeled, read_validation
from pipeline.training.inputs import evaluation_tensor, make_views
from pipeline.training.evaluate import predict_table
from pipeline.training.loop import METRICS_LINES, EpochTotals, StepObserver, Trainer

from conftest import build_tiny_split
from thread_group import ThreadCollectives, ThreadGroup


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return build_tiny_split(tmp_path_factory.mktemp("training"))


def tiny_config(split_dir: str, storage: str, method: str = "supervised", **overrides):
    settings = {
        "method": method,
        "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "unlabeled_ratio": 1,
                 "shuffle_buffer": 64},
        "evaluation": {"windows": [5], "batch_size": 64},
        "run": {"name": "tiny", "storage": storage, "epochs": 2, "steps_per_epoch": 3},
    }
    for key, value in overrides.items():
        if "__" not in key:
            settings[key] = value
            continue
        section, field = key.split("__")
        settings[section][field] = value
    return load_config(base=settings)


def test_metrics_and_checkpoints_are_written(tiny_split, tmp_path):
    final = Trainer(tiny_config(tiny_split, str(tmp_path))).fit()
    run = tmp_path / "tiny"
    lines = [json.loads(line) for line in (run / METRICS_LINES).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    record = lines[-1]
    for key in ("losses", "learning_rates", "images_per_second", "validation", "thresholds",
                "pseudo_label_acceptance_rate", "pseudo_label_histogram", "pseudo_label_quality"):
        assert key in record
    validation = record["validation"]
    # The reported macro-F1 is the one its own confusion matrix gives (sklearn as the oracle), and
    # every validation frame with a label is scored.
    confusion = np.array(validation["confusion"])
    assert confusion.shape == (8, 8)
    targets = np.repeat(np.arange(8), confusion.sum(axis=1))
    predictions = np.concatenate([np.repeat(np.arange(8), row) for row in confusion])
    assert validation["macro_f1"] == pytest.approx(
        f1_score(targets, predictions, labels=range(8), average="macro", zero_division=0))
    labels = read_validation(tiny_split).labels
    assert validation["scored_frames"] == confusion.sum() == int((labels >= 0).sum())
    assert set(validation["smoothed"]) == {"5"}
    assert checkpoint.list_checkpoints(str(run)) == [1, 2]
    assert final["epochs"] == 2 and final["steps"] == 6
    # The best epoch is chosen on the selection half of the validation videos, and reported with
    # its report-half figure.
    best = max(lines, key=lambda line: line["validation"]["halves"]["selection"]["macro_f1"])
    written = json.loads((run / "metrics.json").read_text())
    assert written["best_epoch"] == best["epoch"]
    assert written["best_report_macro_f1"] == best["validation"]["halves"]["report"]["macro_f1"]
    assert validation["halves"]["selection"]["frames"] + validation["halves"]["report"]["frames"] == len(labels)
    assert tensorboard_tags(run / "tensorboard") >= {
        "loss/loss", "validation/macro_f1", "validation/macro_f1_smoothed_5", "throughput/images_per_second",
        "validation_selection/macro_f1", "validation_report/macro_f1_smoothed_5"}


def seen_unlabeled_rows(config, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The hidden labels and sources of the decodable unlabeled rows a one-process run of `config`
    takes in `steps` steps, replayed from its stream (same seed, same order)."""
    stream = UnlabeledStream(config.data.split, config.run.seed, config.data.shuffle_buffer,
                             config.data.unlabeled_sources)
    per_step = config.data.labeled_batch * config.data.unlabeled_ratio
    images, labels, sources, _ = stream.take(per_step * steps)
    _, decoded = make_views(config.data)[0].decode(images)
    return labels[decoded], sources[decoded]


def test_pseudo_label_quality_counts_the_rows_the_method_saw(tiny_split, tmp_path):
    config = tiny_config(tiny_split, str(tmp_path), method="dtm", run__epochs=1,
                         method_options={"initial_threshold": 0.0})
    Trainer(config).fit()
    record = json.loads((tmp_path / "tiny" / METRICS_LINES).read_text().splitlines()[0])
    quality = record["pseudo_label_quality"]
    labels, sources = seen_unlabeled_rows(config, steps=3)
    assert quality["rows_with_hidden_label"] == int((labels >= 0).sum()) > 0
    assert quality["unknown"]["rows"] == int((labels < 0).sum()) > 0
    # Per source: the rows with a hidden label and those without.
    expected = {schema.SOURCES[index]: (int((labels[sources == index] >= 0).sum()),
                                        int((labels[sources == index] < 0).sum()))
                for index in np.unique(sources)}
    assert {source: (figures["rows_with_hidden_label"], figures["unknown"]["rows"])
            for source, figures in quality["per_source"].items()} == expected
    # τ⁰ = 0: every pseudo label is accepted, so accepted rows = rows, and their labels add up to the
    # acceptance histogram the method reported.
    assert quality["accepted"] == quality["rows_with_hidden_label"]
    assert sum(record["pseudo_label_histogram"]) == len(labels)  # every row the replay says was seen
    assert record["pseudo_label_acceptance_rate"] == 1.0
    assert sum(figures["accepted_as"] for figures in quality["per_class"].values()) == quality["accepted"]
    correct = sum(np.diag(np.array(quality["confusion"])))
    assert quality["accuracy"] == pytest.approx(correct / quality["accepted"])


def expected_thresholds(method_name: str, options, probabilities: torch.Tensor, targets: torch.Tensor,
                        before: torch.Tensor, epoch: int) -> torch.Tensor:
    """Each threshold kind's update written out from its paper, without the trainer's code."""
    expected = before.clone()
    if method_name == "dtm":
        # ABAW5 eqs. (6)-(8): τ_c ← µ·τ_c + (1-µ)·(mean p_c over the images of class c the EMA
        # network gets right); a class with none keeps its threshold.
        for label in range(schema.NUM_CLASSES):
            right = (targets == label) & (probabilities.argmax(dim=1) == label)
            if right.any():
                expected[label] = (options.threshold_momentum * before[label]
                                   + (1 - options.threshold_momentum) * probabilities[right, label].mean())
    elif method_name == "mutexmatch":
        # Third paper, eq. (4): T_c = β·m_c / (1 + γ^-epoch), m_c the mean p_c over every image labeled c.
        for label in range(schema.NUM_CLASSES):
            mean = probabilities[targets == label, label].mean()
            expected[label] = options.threshold_scale * mean / (1 + options.threshold_base ** -epoch)
    else:
        # Noise-aware: T_c = the mean predicted probability of class c over the labeled set.
        expected = probabilities.mean(dim=0)
    return expected


@pytest.mark.parametrize("method_name", ["dtm", "mutexmatch", "noise_aware"])
def test_thresholds_after_each_epoch_equal_an_independent_computation(tiny_split, tmp_path, method_name):
    """After epoch 2 the thresholds in the checkpoint are those recomputed here from the epoch-1
    thresholds, the threshold network of epoch 2 and the whole labeled set."""
    config = tiny_config(tiny_split, str(tmp_path), method=method_name, run__epochs=2,
                         run__checkpoints_to_keep=0)
    Trainer(config).fit()
    folder = tmp_path / "tiny" / checkpoint.CHECKPOINT_FOLDER
    states = [checkpoint.load(str(folder / checkpoint.checkpoint_name(epoch))) for epoch in (1, 2)]
    method = config.method_class()(config.options(), MethodContext(
        model=config.model, optimizer=config.optimizer, total_steps=config.total_steps))
    method.load_state_dict(states[0]["method"])
    before = method.thresholds().double()
    method.load_state_dict(states[1]["method"])
    after = method.thresholds().double()
    labeled = read_labeled(tiny_split)
    images, decoded = evaluation_tensor(labeled.take_images(np.arange(len(labeled))), config.data,
                                        torch.device("cpu"))
    network = (method.ema.model if method_name == "dtm" else method.model).eval()
    with torch.no_grad():
        probabilities = network(images[torch.from_numpy(decoded)]).softmax(dim=1).double()
    targets = torch.from_numpy(labeled.labels[decoded]).long()
    expected = expected_thresholds(method_name, config.options(), probabilities, targets, before, epoch=2)
    assert not torch.allclose(expected, before, rtol=0, atol=1e-6)  # an update never applied shows
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_unlabeled", [True, False])
def test_unlabeled_batches_of_the_configured_size_reach_the_method_every_step(tiny_split, tmp_path,
                                                                             use_unlabeled):
    config = tiny_config(tiny_split, str(tmp_path), method="dtm", run__epochs=2,
                         data__unlabeled_ratio=2, data__use_unlabeled=use_unlabeled)
    seen = []

    class Sizes(StepObserver):
        def before_step(self, trainer, batch):
            seen.append((trainer.global_step, batch.labels.shape[0],
                         None if batch.unlabeled_weak is None else batch.unlabeled_weak.shape[0],
                         None if batch.unlabeled_strong is None else batch.unlabeled_strong.shape[0]))

    Trainer(config, step_observer=Sizes()).fit()
    unlabeled = 8 * 2 if use_unlabeled else None
    assert seen == [(step, 8, unlabeled, unlabeled) for step in range(6)]


def tensorboard_tags(folder) -> set[str]:
    """Scalar tags in the TFRecord event files of `folder` (read with tensorboardX's protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack_from("<Q", data, position)
            event = Event.FromString(data[position + 12:position + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            position += 12 + length + 4
    return tags


def tensors(value, prefix=""):
    """Every tensor in a nested state, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(tensors(item, f"{prefix}/{index}"))
    return found


@pytest.mark.parametrize("method, precision", [("supervised", "fp32"), ("dtm", "fp32"), ("dtm", "bf16")])
def test_resume_continues_exactly(tiny_split, tmp_path, method, precision):
    """Stopping after epoch 1 and resuming gives the same networks, EMA, optimizer and threshold
    state as an uninterrupted run (the unlabeled stream replays to its exact position), in fp32
    and in the recipes' bf16."""
    configure = lambda folder: tiny_config(tiny_split, str(tmp_path / folder), method=method,
                                           run__precision=precision)
    straight = Trainer(configure("a")).fit()
    first = configure("b")
    first.run.epochs = 1
    Trainer(first).fit()
    resumed = Trainer(configure("b")).fit()
    assert resumed["steps"] == straight["steps"] == 6
    straight_state = tensors(checkpoint.load(checkpoint.latest(str(tmp_path / "a" / "tiny")))["method"])
    resumed_state = tensors(checkpoint.load(checkpoint.latest(str(tmp_path / "b" / "tiny")))["method"])
    assert straight_state.keys() == resumed_state.keys() and straight_state
    for key, value in straight_state.items():
        assert torch.equal(value, resumed_state[key]), key


def test_rerun_of_a_finished_run_trains_nothing_more(tiny_split, tmp_path):
    config = tiny_config(tiny_split, str(tmp_path))
    Trainer(config).fit()
    again = Trainer(tiny_config(tiny_split, str(tmp_path))).fit()
    assert again["steps"] == 6
    assert checkpoint.list_checkpoints(str(tmp_path / "tiny")) == [1, 2]


@pytest.mark.parametrize("method", ["dtm", "mutexmatch"])
def test_threshold_methods_update_thresholds_each_epoch(tiny_split, tmp_path, method):
    pytest.importorskip(f"pipeline.methods.{method}")
    final = Trainer(tiny_config(tiny_split, str(tmp_path), method=method)).fit()
    lines = [json.loads(line) for line in (tmp_path / "tiny" / METRICS_LINES).read_text().splitlines()]
    assert all(len(line["thresholds"]) == 8 for line in lines)
    assert lines[-1]["pseudo_label_acceptance_rate"] is not None
    assert final["steps"] == 6


def test_train_command_reports_config_errors(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: supervised\nrun:\n  epochs: 2\n")
    assert train_job.main(["--config", str(recipe), "--set", "run.epochz=3"]) == 2
    assert "run.epochz: unknown key" in capsys.readouterr().err
    assert train_job.main(["--config", str(recipe), "--set", "method_options.label_smoothing=oops"]) == 2
    assert "method_options.label_smoothing" in capsys.readouterr().err
    assert train_job.main(["--config", str(recipe), "--print-config", "--set", "run.epochs=5"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["epochs"] == 5
    assert train_job.main(["--config", str(recipe)]) == 2  # the recipe names no split
    assert "data.split" in capsys.readouterr().err


def test_every_recipe_loads():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "recipes")
    recipes = sorted(name for name in os.listdir(folder) if name.endswith(".yaml"))
    assert recipes
    for name in recipes:
        if name.endswith("temporal.yaml"):  # jobs.train_temporal's own config
            from pipeline.temporal.training import load_temporal_config

            assert load_temporal_config(os.path.join(folder, name)).temporal.clip_length >= 1
            continue
        config = load_config(os.path.join(folder, name))
        assert config.method
        if config.model.pretrained and not config.model.pretrained_path:
            # timm would fail at the first worker: it has weights only under some names (its
            # EfficientNet-B7 weights are the TensorFlow port's, `tf_efficientnet_b7`).
            assert timm.list_pretrained(config.model.backbone + "*"), f"{name}: no timm weights"


class HostToDevice(TorchFunctionMode):
    """Counts copies of host tensors to another device (`.to`, `copy_`, `torch.tensor(device=)`):
    on a GPU each is a transfer the step waits on unless pinned, so a step keeps them few."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in (torch.Tensor.to, torch.Tensor.copy_) and source is not None and isinstance(result, torch.Tensor):
            origin = args[1] if func is torch.Tensor.copy_ else source
            if isinstance(origin, torch.Tensor) and origin.device.type == "cpu" and result.device.type != "cpu":
                self.copies += 1
        elif func is torch.tensor and isinstance(result, torch.Tensor) and result.device.type != "cpu":
            self.copies += 1
        return result


SYNC_FREE_METHODS = ["supervised", "dtm", "feedback", "mutexmatch", "noise_aware"]


@pytest.mark.parametrize("method", SYNC_FREE_METHODS)
def test_a_training_step_never_reads_a_device_value(tiny_split, tmp_path, method):
    """The whole step (the batch to the device, the views, the method's step, the pseudo-label
    counts and the loss sums) runs on the `meta` device, which has shapes but no data: any read of
    a device value on the host (`.item()`, `.cpu()`, `bool(tensor)`, a mask index, `bincount`),
    each a host wait on a GPU, fails there. The host-to-device copies stay within a budget: the
    batch's arrays, and one per view for its random parameters (two more for a strong view's
    RandAugment rounds, one for its erasing)."""
    config = tiny_config(tiny_split, str(tmp_path), method, run__log_every_steps=0, run__precision="fp32")
    trainer = Trainer(config, device=torch.device("meta"))
    totals = EpochTotals()
    totals.pseudo_label_counts = totals.pseudo_label_counts.to("meta")
    indices = trainer.sampler.indices(0)
    batch_size = config.data.labeled_batch
    first, second = indices[:batch_size], indices[batch_size:2 * batch_size]
    trainer.inputs.prefetch(first)
    counter = HostToDevice()
    try:
        trainer.train_step(first, second, totals)  # copies its constants (a normalisation's) once
        with counter:
            trainer.train_step(second, None, totals)
    finally:
        trainer.inputs.close()
    assert totals.steps == 2 and trainer.global_step == 2
    assert {value.device.type for value in totals.sums.values()} == {"meta"}
    needs = type(trainer.method).views
    strong_views = int(needs.labeled_strong) + int(needs.unlabeled and needs.unlabeled_strong)
    weak_views = 1 + int(needs.unlabeled)
    arrays = 2 + 3 * int(needs.unlabeled)  # labeled pixels and labels; unlabeled pixels, labels, sources
    budget = arrays + weak_views + strong_views * (1 + config.data.randaugment_ops + 1)
    assert 0 < counter.copies <= budget + int(method == "mutexmatch")  # + its complementary labels


def test_validation_split_over_two_workers_equals_one_process(tiny_split, tmp_path):
    """Each worker predicts every other validation row (in batches decoded ahead in a thread), the
    rows are gathered, and rank 0's report is the one-process report."""
    config = tiny_config(tiny_split, str(tmp_path), "dtm")
    config.evaluation.batch_size = 7  # several batches per worker, the last one short
    single = Trainer(config, save_checkpoints=False)
    expected_probabilities = predict_table(single.validation, single.method.predict,
                                           single.inputs.evaluation_images, 7)
    expected = single.evaluate()
    group = ThreadGroup(2)
    trainers = [Trainer(config, ThreadCollectives(group, rank), rank, 2, save_checkpoints=False)
                for rank in range(2)]
    predicted_rows = [0, 0]
    results: dict[int, tuple] = {}

    def run(rank: int) -> None:
        trainer = trainers[rank]
        trainer.method.load_state_dict(single.method.state_dict())

        def predict(images: torch.Tensor) -> torch.Tensor:
            predicted_rows[rank] += len(images)
            return trainer.method.predict(images)

        probabilities = predict_table(trainer.validation, predict, trainer.inputs.evaluation_images, 7,
                                      trainer.collectives, rank, 2)
        results[rank] = (probabilities, trainer.evaluate())

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = len(single.validation)
    assert sorted(predicted_rows) == [rows // 2, rows - rows // 2]
    for rank in range(2):
        np.testing.assert_allclose(results[rank][0], expected_probabilities, rtol=1e-5, atol=1e-7)
    assert results[1][1] is None
    assert json.dumps(results[0][1], sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_optimizers_are_fused_where_torch_has_fused_kernels():
    from pipeline.methods.base import OptimizerConfig, build_optimizer

    for name in ("sgd", "adam", "adamw"):
        optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimizerConfig(name=name, lr=0.1))
        assert optimizer.param_groups[0]["fused"] is True, name
    on_meta = build_optimizer([torch.nn.Parameter(torch.zeros(3, device="meta"))], OptimizerConfig(lr=0.1))
    assert not on_meta.param_groups[0]["fused"]


def test_the_cuda_math_settings_follow_the_run_config(tiny_split, tmp_path):
    from pipeline.training.loop import configure_backends

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.backends.cudnn.benchmark)
    saved = flags()
    run = tiny_config(tiny_split, str(tmp_path)).run
    try:
        run.tf32, run.cudnn_benchmark = False, True
        configure_backends(torch.device("cuda"), run)
        assert flags() == (False, False, True)
        run.tf32, run.cudnn_benchmark = True, False
        configure_backends(torch.device("cuda"), run)
        assert flags() == (True, True, False)
        run.tf32, run.cudnn_benchmark = False, True
        configure_backends(torch.device("cpu"), run)  # nothing to set off CUDA
        assert flags() == (True, True, False)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


@pytest.mark.slow
def test_compiled_networks_train_and_keep_their_checkpoint_format(tiny_split, tmp_path):
    """run.compile compiles the trained network in place (not the EMA copy), the run trains, and
    its checkpoint loads into an uncompiled method (the keys do not change)."""
    compiled = Trainer(tiny_config(tiny_split, str(tmp_path / "compiled"), "dtm", run__compile="aot_eager",
                                   run__epochs=1))
    assert compiled.method.model._compiled_call_impl is not None
    assert all(module._compiled_call_impl is None for module in compiled.method.ema.model.modules())
    final = compiled.fit()
    assert final["epochs"] == 1
    state = checkpoint.load(checkpoint.latest(str(tmp_path / "compiled" / "tiny")))["method"]
    plain = Trainer(tiny_config(tiny_split, str(tmp_path / "plain"), "dtm", run__epochs=1))
    assert set(state["model"]) == set(plain.method.model.state_dict())  # no _orig_mod. prefixes
    plain.method.load_state_dict(state)
    for name, value in plain.method.model.state_dict().items():
        assert torch.equal(value, compiled.method.model.state_dict()[name]), name


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("epoch_rule, lr_rule, steps, factor", [
    ("steps", "none", 5, 1.0), ("images", "linear", 2, 4.0), ("images", "sqrt", 2, 2.0)])
def test_the_scaling_rule_sets_steps_per_worker_and_learning_rates(tiny_split, tmp_path, epoch_rule, lr_rule,
                                                                   steps, factor):
    """With 4 workers and 5 steps per epoch: `steps` keeps 5 steps per worker, `images` takes 2
    (ceil 5/4); the learning rates, and the schedule they follow, are one process's times the rule."""
    options = dict(method="feedback", run__epochs=2,
                   optimizer={"name": "sgd", "lr": 0.1, "schedule": "cosine", "warmup_steps": 2})
    config = tiny_config(tiny_split, str(tmp_path / "four"), run__steps_per_epoch=5, **options,
                         scaling={"epoch_rule": epoch_rule, "lr_rule": lr_rule})
    worker = Trainer(config, ThreadCollectives(ThreadGroup(4), 0), rank=0, world_size=4)
    assert worker.steps_per_epoch == steps
    assert len(worker.sampler.indices(0)) == steps * config.data.labeled_batch
    # One process taking as many steps: the worker's schedule is its schedule times the rule.
    single = Trainer(tiny_config(tiny_split, str(tmp_path / "one"), run__steps_per_epoch=steps, **options))
    for name in ("teacher", "student"):
        ours, theirs = (getattr(trainer.method, f"{name}_scheduler") for trainer in (worker, single))
        assert ours.base_lrs == pytest.approx([factor * rate for rate in theirs.base_lrs])
        assert getattr(worker.method, f"{name}_optimizer").param_groups[0]["lr"] == pytest.approx(
            factor * getattr(single.method, f"{name}_optimizer").param_groups[0]["lr"])
        for _ in range(2):
            ours.step()
            theirs.step()
        assert ours.get_last_lr() == pytest.approx([factor * rate for rate in theirs.get_last_lr()])


@pytest.mark.slow
def test_a_progress_line_comes_every_few_seconds_within_an_epoch(tiny_split, tmp_path, capsys):
    # log_every_seconds tiny: every step is "due"; the last step of the epoch has the epoch's line.
    config = tiny_config(tiny_split, str(tmp_path), "dtm", run__log_every_steps=0,
                         run__log_every_seconds=1e-9, run__epochs=1)
    Trainer(config).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line and "ETA" in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1/3", "2/3"]
    for line in lines:
        assert re.search(r"loss \d+\.\d{4}  \d+ img/s  epoch ETA \d+:\d\d  accepted \d\.\d\d$", line), line
    quiet = tiny_config(tiny_split, str(tmp_path / "quiet"), "dtm", run__log_every_steps=0,
                        run__log_every_seconds=0, run__epochs=1)
    Trainer(quiet).fit()
    assert "ETA" not in capsys.readouterr().out
