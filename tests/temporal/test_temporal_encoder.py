"""The temporal refine: padding honoured by the encoder and the loss, clip drawing and inference
windows, predictions in input order, a learning check against a per-frame classifier, gradient
averaging over two in-process workers, and a bit-exact resume."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from torch.nn import functional

from pipeline.config import ConfigError, from_mapping
from pipeline.core.metrics import macro_f1
from pipeline.temporal.encoder import (PADDING, FrameSequences, TemporalConfig, TemporalEncoder,
                                       TemporalTrainer, masked_cross_entropy, predict_sequences)

from thread_group import ThreadCollectives, ThreadGroup

TINY = dict(clip_length=16, model_dim=16, layers=1, heads=2, feedforward_dim=32, batch_clips=4)


def tiny_config(**overrides) -> TemporalConfig:
    return TemporalConfig(**{**TINY, **overrides})


def shuffled_sequences(lengths: dict[str, int], clip_length: int, feature_dim: int = 6, seed: int = 0,
                       unlabeled_videos: tuple[str, ...] = ()) -> FrameSequences:
    """Videos of consecutive frames (numbered from 1), rows shuffled; feature 0 holds the frame."""
    rng = np.random.default_rng(seed)
    videos = np.concatenate([[video] * length for video, length in lengths.items()])
    frames = np.concatenate([np.arange(1, length + 1) for length in lengths.values()])
    labels = rng.integers(0, 8, videos.size)
    labels[np.isin(videos, unlabeled_videos)] = -1
    features = rng.normal(size=(videos.size, feature_dim)).astype(np.float32)
    features[:, 0] = frames
    order = rng.permutation(videos.size)
    return FrameSequences(features[order], labels[order], videos[order], frames[order], clip_length)


def test_config_is_typed_and_checked():
    config = from_mapping(TemporalConfig, {"clip_length": 32, "positional": "learned", "stride": 8})
    assert config.clip_length == 32 and config.inference_stride == 8
    assert TemporalConfig().inference_stride == 32 and TemporalConfig().total_steps == 5000
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(TemporalConfig, {"clip_len": 32})
    with pytest.raises(ConfigError, match="temporal.heads"):
        TemporalConfig(model_dim=30, heads=4)
    with pytest.raises(ConfigError, match="temporal.positional"):
        from_mapping(TemporalConfig, {"positional": "rotary"})
    with pytest.raises(ConfigError, match="temporal.stride"):
        TemporalConfig(clip_length=8, stride=9)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_encoder_shapes_and_padding_never_reaches_real_frames(positional):
    torch.manual_seed(0)
    model = TemporalEncoder(6, tiny_config(positional=positional, dropout=0.0)).eval()
    features = torch.randn(3, 16, 6)
    padding = torch.zeros(3, 16, dtype=torch.bool)
    padding[0, 10:] = True
    padding[2, 1:] = True
    logits = model(features, padding)
    assert logits.shape == (3, 16, 8)
    changed = features.clone()
    changed[padding] = torch.randn(int(padding.sum()), 6) * 100
    changed[0, 12] = float("nan")
    torch.testing.assert_close(model(changed, padding)[~padding], logits[~padding])
    # Without the mask the padded frames do change the others: the check above is not vacuous.
    assert not torch.allclose(model(changed.nan_to_num(), None)[0, :10], logits[0, :10])
    # The no-grad inference path agrees with the autograd path.
    with torch.no_grad():
        torch.testing.assert_close(model(features, padding)[~padding], logits[~padding])
    assert model(features[:, :5]).shape == (3, 5, 8)


def test_learned_positions_stop_at_clip_length():
    model = TemporalEncoder(6, tiny_config(positional="learned"))
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.randn(1, 17, 6))


def test_loss_ignores_minus_one_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.tensor([[1, -1, 3, 7, 2], [0, 4, -1, 5, 6]])
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    counted = (labels != -1) & ~padding
    expected = functional.cross_entropy(logits[counted], labels[counted])
    torch.testing.assert_close(masked_cross_entropy(logits, labels, padding), expected)
    for smoothing in (0.0, 0.2):
        loss = masked_cross_entropy(logits, labels, padding, smoothing)
        # Padded frames may carry any label; ignored frames' logits may be anything.
        relabeled = labels.clone()
        relabeled[padding] = torch.tensor([0, 4])
        other_logits = torch.where(counted[..., None], logits, torch.randn(2, 5, 8) * 10)
        torch.testing.assert_close(masked_cross_entropy(other_logits, relabeled, padding, smoothing), loss)
        (gradient,) = torch.autograd.grad(loss, logits)
        assert torch.equal(gradient[~counted], torch.zeros_like(gradient[~counted]))
        assert gradient[counted].abs().sum() > 0


def test_loss_without_any_labeled_frame_is_zero_with_zero_gradient():
    logits = torch.randn(1, 4, 8, requires_grad=True)
    padding = torch.tensor([[False, False, True, True]])
    loss = masked_cross_entropy(logits, torch.tensor([[-1, -1, 2, 3]]), padding)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_training_clips_come_from_labeled_videos_in_frame_order():
    sequences = shuffled_sequences({"long": 100, "short": 10, "silent": 50}, clip_length=32,
                                   unlabeled_videos=("silent",))
    video_of_row = np.empty(len(sequences), dtype=object)
    for name, start, end in zip(sequences.video_names, sequences.video_starts, sequences.video_ends):
        video_of_row[sequences.order[start:end]] = name
    frame_of_row = sequences.features[:, 0].numpy().astype(np.int64)
    clips = sequences.training_clips(np.random.default_rng(1), 3500)
    assert clips.shape == (3500, 32) and clips.dtype == np.int64
    starts = {"long": [], "short": []}
    for clip in clips:
        real = clip[clip != PADDING]
        assert (clip[:real.size] == real).all(), "padding only at the end"
        videos = set(video_of_row[real])
        assert len(videos) == 1
        video = videos.pop()
        frames = frame_of_row[real]
        assert np.array_equal(frames, np.arange(frames[0], frames[0] + real.size))
        if video == "short":
            assert real.size == 10 and frames[0] == 1
        else:
            assert video == "long" and real.size == 32
        starts[video].append(frames[0])
    # 69 starts in the long video, 1 in the short one: uniform over the 70.
    assert sorted(set(starts["long"])) == list(range(1, 70))
    assert len(starts["short"]) / len(clips) == pytest.approx(1 / 70, abs=0.01)


def test_training_clips_need_a_labeled_video():
    sequences = shuffled_sequences({"a": 5}, clip_length=4, unlabeled_videos=("a",))
    with pytest.raises(ValueError, match="no video has a labeled frame"):
        sequences.training_clips(np.random.default_rng(0), 1)


@pytest.mark.parametrize("stride", [None, 1, 5, 16])
def test_inference_windows_cover_every_frame(stride):
    lengths = {"a": 100, "b": 16, "c": 3, "d": 17}
    sequences = shuffled_sequences(lengths, clip_length=16)
    windows = sequences.inference_clips(stride)
    coverage = np.bincount(windows[windows != PADDING], minlength=len(sequences))
    assert coverage.min() >= 1
    frame_of_row = sequences.features[:, 0].numpy().astype(np.int64)
    for window in windows:
        real = window[window != PADDING]
        frames = frame_of_row[real]
        assert np.array_equal(frames, np.arange(frames[0], frames[0] + real.size))
    if stride is None:  # stride 8. a: frames 1, 9, ..., 81, and 85 to end at 100; b, c: one window;
        assert windows.shape[0] == 12 + 1 + 1 + 2  # d: frames 1 and 2 (to end at 17)


def test_gather_pads_with_minus_one_labels():
    sequences = shuffled_sequences({"a": 3}, clip_length=5)
    clips = sequences.inference_clips()
    features, labels, padding = sequences.gather(clips)
    assert features.shape == (1, 5, 6) and labels.shape == padding.shape == (1, 5)
    assert padding.tolist() == [[False, False, False, True, True]]
    assert labels[0, 3:].tolist() == [-1, -1]


def test_frame_sequences_reject_bad_input():
    with pytest.raises(ValueError, match="more than once"):
        FrameSequences(np.zeros((2, 3)), [0, 1], ["a", "a"], [4, 4], 8)
    with pytest.raises(ValueError, match="-1..7"):
        FrameSequences(np.zeros((1, 3)), [8], ["a"], [1], 8)
    with pytest.raises(ValueError, match="NaN"):
        FrameSequences(np.full((1, 3), np.nan), [0], ["a"], [1], 8)
    with pytest.raises(ValueError, match="one value per row"):
        FrameSequences(np.zeros((2, 3)), [0], ["a", "a"], [1, 2], 8)


class PositionBiased(torch.nn.Module):
    """Logits = features·W + a bias per clip position, so a frame's probabilities depend on where
    each window puts it: the average over windows is then checkable by hand."""

    def __init__(self, feature_dim: int, clip_length: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(feature_dim, 8, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(clip_length, 8, generator=generator))

    def forward(self, features, padding_mask=None):
        return features @ self.weight + self.bias[:features.shape[1]]


def test_predictions_average_windows_in_the_input_order():
    sequences = shuffled_sequences({"a": 40, "b": 7, "c": 23}, clip_length=10, feature_dim=4)
    sequences.features[:, 0] = 0.0  # the frame number would saturate the softmax
    model = PositionBiased(4, 10).train()
    probabilities = predict_sequences(model, sequences, batch_clips=3, stride=4)
    assert model.training, "the model's mode is restored"
    assert probabilities.shape == (len(sequences), 8) and probabilities.dtype == np.float32
    expected = np.zeros((len(sequences), 8))
    counts = np.zeros(len(sequences))
    with torch.no_grad():
        for window in sequences.inference_clips(4):
            for position, row in enumerate(window.tolist()):
                if row != PADDING:
                    logits = sequences.features[row] @ model.weight + model.bias[position]
                    expected[row] += torch.softmax(logits, 0).numpy()
                    counts[row] += 1
    np.testing.assert_allclose(probabilities, expected / counts[:, None], rtol=1e-5, atol=1e-6)
    assert (counts >= 2).sum() > len(sequences) // 2, "windows overlap: averaging is exercised"


def synthetic_videos(rng: np.random.Generator, videos: int, length: int, prototypes: np.ndarray,
                     noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels constant over runs of 15-25 frames; each frame's features are its class prototype plus
    noise large enough that one frame alone is often misread."""
    features, labels, names, frames = [], [], [], []
    for video in range(videos):
        runs: list[int] = []
        while len(runs) < length:
            runs += [int(rng.integers(0, 8))] * int(rng.integers(15, 26))
        video_labels = np.array(runs[:length])
        features.append(prototypes[video_labels] + noise * rng.normal(size=(length, prototypes.shape[1])))
        labels.append(video_labels)
        names += [f"video{video}"] * length
        frames.append(np.arange(1, length + 1))
    return (np.concatenate(features).astype(np.float32), np.concatenate(labels), np.array(names),
            np.concatenate(frames))


@pytest.mark.slow
def test_temporal_model_beats_a_per_frame_classifier_on_noisy_runs():
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(8, 16))
    train = synthetic_videos(rng, 40, 300, prototypes, noise=3.0)
    test = synthetic_videos(rng, 20, 300, prototypes, noise=3.0)
    train_labels = np.where(rng.random(train[1].size) < 0.2, -1, train[1])  # some frames unlabeled

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.05)
    features, labels = torch.from_numpy(train[0]), torch.from_numpy(train_labels)
    for _ in range(300):
        optimizer.zero_grad()
        functional.cross_entropy(linear(features), labels, ignore_index=-1).backward()
        optimizer.step()
    with torch.no_grad():
        per_frame = macro_f1(test[1], linear(torch.from_numpy(test[0])).argmax(1).numpy())

    def temporal_f1(clip_length: int) -> float:
        config = TemporalConfig(clip_length=clip_length, model_dim=32, layers=1, heads=2,
                                feedforward_dim=64, learning_rate=3e-3, batch_clips=16, steps=300,
                                epochs=1)
        trainer = TemporalTrainer(config, FrameSequences(train[0], train_labels, train[2], train[3],
                                                         clip_length))
        losses = trainer.fit()
        assert len(losses) == 1 and trainer.step == 300
        probabilities = predict_sequences(trainer.model, FrameSequences(*test, clip_length), 16)
        return macro_f1(test[1], probabilities.argmax(1))

    temporal = temporal_f1(32)
    # The control: with one-frame clips the same model has no context and no advantage.
    without_context = temporal_f1(1)
    print(f"macro-F1: per-frame {per_frame:.3f}, temporal {temporal:.3f}, "
          f"one-frame clips {without_context:.3f}")
    assert per_frame < 0.6, "the per-frame task must be hard for the comparison to mean anything"
    assert temporal >= per_frame + 0.2
    assert without_context < per_frame + 0.05


def test_two_workers_draw_different_clips_and_stay_identical():
    sequences = shuffled_sequences({"a": 60, "b": 45, "c": 30}, clip_length=16, seed=3)
    config = tiny_config(seed=5)
    group = ThreadGroup(2)
    trainers = [TemporalTrainer(config, sequences, ThreadCollectives(group, rank), rank, 2)
                for rank in range(2)]
    first_clips = [sequences.training_clips(np.random.default_rng([5, rank]), 4) for rank in range(2)]
    assert not np.array_equal(*first_clips), "each rank draws its own clips"
    losses: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            losses[rank] = trainers[rank].train_steps(5)
        except BaseException as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert losses[0] != losses[1], "different clips give different local losses"
    # Every mean handed back is the mean of what the two ranks contributed, bit for bit the same.
    by_call: dict[int, list] = {0: [], 1: []}
    for rank, given, mean in group.means:
        by_call[rank].append((given, mean))
    assert len(by_call[0]) == len(by_call[1]) >= 5
    for (given0, mean0), (given1, mean1) in zip(by_call[0], by_call[1]):
        torch.testing.assert_close(mean0, (given0 + given1) / 2)
        assert torch.equal(mean0, mean1)
    for name, parameter in trainers[0].model.state_dict().items():
        assert torch.equal(parameter, trainers[1].model.state_dict()[name]), name
    # And averaging mattered: rank 0 alone ends elsewhere.
    alone = TemporalTrainer(config, sequences)
    alone.train_steps(5)
    assert not torch.equal(alone.model.classifier.weight, trainers[0].model.classifier.weight)


def test_several_workers_need_collectives():
    sequences = shuffled_sequences({"a": 20}, clip_length=16)
    with pytest.raises(ValueError, match="collectives"):
        TemporalTrainer(tiny_config(), sequences, None, rank=0, world_size=2)
    with pytest.raises(ValueError, match="clips of 16"):
        TemporalTrainer(tiny_config(clip_length=8), sequences)


def test_resume_is_bit_exact():
    sequences = shuffled_sequences({"a": 60, "b": 10, "c": 33}, clip_length=16, seed=4)
    config = tiny_config(dropout=0.3, seed=2, steps=10, epochs=2)  # dropout: its generator is saved too
    trainer = TemporalTrainer(config, sequences)
    trainer.train_steps(10)
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    torch.manual_seed(123)  # the global generator is not what dropout draws from
    continued = trainer.fit()
    assert trainer.step == 20 and len(continued) == 1

    buffer.seek(0)
    resumed = TemporalTrainer(config, sequences)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 10
    assert resumed.fit() == continued
    for name, parameter in trainer.model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name
    for key, value in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, resumed.optimizer.state_dict()["state"][0][key]), key


def test_trainer_leaves_the_global_generator_alone():
    sequences = shuffled_sequences({"a": 40}, clip_length=16)
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    trainer = TemporalTrainer(tiny_config(), sequences)
    trainer.train_steps(2)
    assert torch.equal(torch.rand(3), expected)


def test_the_ablation_halves_split_whole_videos_as_the_frame_training_does():
    """The temporal stage scores its rows on the same selection/report halves as the Trainer
    (`validation_halves`, same seed): each half's figures are those of its own videos alone
    (sklearn as the oracle), and the halves share no video."""
    from sklearn.metrics import f1_score

    from pipeline.temporal.training import FeatureSet, TemporalEvaluationConfig, ablation_halves
    from pipeline.training.evaluate import validation_halves

    generator = np.random.default_rng(0)
    videos = np.repeat(np.array([f"video{index}" for index in range(6)], dtype=object), 20)
    frames = np.tile(np.arange(20), 6)
    labels = generator.integers(-1, 8, size=videos.size)
    probabilities = generator.random((videos.size, 8)).astype(np.float32)
    validation = FeatureSet(np.zeros((videos.size, 4), np.float32), labels, videos, frames, probabilities)
    evaluation = TemporalEvaluationConfig(window=1, halves_seed=3)
    halves = ablation_halves(validation, None, evaluation)
    selection = validation_halves(videos, [""] * videos.size, 3)
    assert set(videos[selection]).isdisjoint(set(videos[~selection])) and selection.any() and (~selection).any()
    predicted = probabilities.argmax(axis=1)
    for name, mask in (("selection", selection), ("report", ~selection)):
        scored = mask & (labels >= 0)
        assert halves[name]["scored_frames"] == int(scored.sum())
        expected = f1_score(labels[scored], predicted[scored], labels=sorted(set(labels[scored]) | set(predicted[scored])),
                            average="macro")
        assert halves[name]["frame"] == pytest.approx(expected)
