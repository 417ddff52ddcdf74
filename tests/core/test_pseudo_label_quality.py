"""Pseudo-label quality against hidden labels: a hand-counted case, sklearn as the oracle on random
ones, and the per-source split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_score, recall_score

from pipeline.core.pseudo_label_quality import UNKNOWN, add_counts, empty_counts, flat_quality, quality_report
from pipeline.data import schema

NAMES = ("a", "b", "c")
SOURCES = ("s0", "s1")


def counted(hidden, pseudo, accepted, sources, num_classes=3, num_sources=2):
    counts = empty_counts(num_sources, num_classes)
    add_counts(counts, torch.tensor(hidden), torch.tensor(pseudo), torch.tensor(accepted),
               torch.tensor(sources))
    return counts


def test_hand_counted_case():
    #            hidden  pseudo accepted source
    rows = [(0, 0, True, 0),    # correct
            (0, 1, True, 0),    # wrong
            (0, 0, False, 0),   # rejected
            (1, 1, True, 1),    # correct
            (2, 1, True, 1),    # wrong
            (-1, 2, True, 1),   # no hidden label: accepted as c
            (-1, 0, False, 0)]  # no hidden label: rejected
    hidden, pseudo, accepted, sources = (list(column) for column in zip(*rows))
    report = quality_report(counted(hidden, pseudo, accepted, sources), SOURCES, NAMES)
    assert report["rows_with_hidden_label"] == 5
    assert report["accepted"] == 4
    assert report["acceptance_rate"] == pytest.approx(4 / 5)
    assert report["accuracy"] == pytest.approx(2 / 4)
    assert report["per_class"]["a"] == {"hidden": 3, "accepted_as": 1, "precision": 1.0,
                                        "recall": pytest.approx(1 / 3), "coverage": pytest.approx(2 / 3)}
    assert report["per_class"]["b"]["precision"] == pytest.approx(1 / 3)  # b given 3 times, right once
    assert report["per_class"]["c"] == {"hidden": 1, "accepted_as": 0, "precision": None,
                                        "recall": 0.0, "coverage": 1.0}
    assert report[UNKNOWN] == {"rows": 2, "accepted": 1, "accepted_per_class": {"a": 0, "b": 0, "c": 1}}
    assert report["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert report["per_source"]["s0"]["accuracy"] == pytest.approx(1 / 2)
    assert report["per_source"]["s1"]["accuracy"] == pytest.approx(1 / 2)
    assert report["per_source"]["s1"]["acceptance_rate"] == 1.0
    assert report["per_source"]["s0"]["acceptance_rate"] == pytest.approx(2 / 3)


def test_random_cases_against_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        size = int(rng.integers(1, 300))
        hidden = rng.integers(-1, 8, size)
        pseudo = rng.integers(0, 8, size)
        accepted = rng.random(size) < 0.6
        sources = rng.integers(0, len(schema.SOURCES), size)
        report = quality_report(counted(hidden, pseudo, accepted, sources, 8, len(schema.SOURCES)))
        keep = accepted & (hidden >= 0)
        assert report["accepted"] == keep.sum()
        assert report["confusion"] == confusion_matrix(hidden[keep], pseudo[keep], labels=range(8)).tolist()
        if keep.any():
            precision = precision_score(hidden[keep], pseudo[keep], labels=range(8), average=None, zero_division=0)
            given = np.bincount(pseudo[keep], minlength=8)
            for index, name in enumerate(schema.CLASS_NAMES):
                expected = precision[index] if given[index] else None
                assert report["per_class"][name]["precision"] == pytest.approx(expected)
            # Recall of the accepted pseudo labels over every row with that hidden label, accepted
            # or not: sklearn's recall on all known rows with rejected rows predicted as "none" (8).
            known = hidden >= 0
            predictions = np.where(accepted, pseudo, 8)[known]
            recall = recall_score(hidden[known], predictions, labels=range(8), average=None, zero_division=0)
            present = np.bincount(hidden[known], minlength=8)
            for index, name in enumerate(schema.CLASS_NAMES):
                expected = recall[index] if present[index] else None
                assert report["per_class"][name]["recall"] == pytest.approx(expected)


def test_source_indices_name_an_unknown_source():
    assert schema.source_indices(["expw", "ms1mv2", "affwild2"]).tolist() == [
        schema.SOURCES.index("expw"), schema.SOURCES.index("ms1mv2"), schema.SOURCES.index("affwild2")]
    with pytest.raises(ValueError, match="'celeba'"):
        schema.source_indices(["expw", "celeba"])


def test_flat_figures_leave_out_what_was_not_seen():
    report = quality_report(counted([0, 1], [0, 0], [True, False], [0, 0]), SOURCES, NAMES)
    flat = flat_quality(report)
    assert flat["pseudo_label_accuracy"] == 1.0
    assert flat["pseudo_label_acceptance_rate"] == 0.5
    assert flat["pseudo_label_precision_a"] == 1.0
    assert "pseudo_label_precision_b" not in flat  # never given
    assert flat["pseudo_label_accuracy_s0"] == 1.0
    assert not any(key.endswith("_s1") for key in flat)  # s1 had no rows
