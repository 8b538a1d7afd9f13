"""metrics.py against numbers worked out by hand on a six-image example."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation.evaluate import Evaluation, ensemble_evaluation
from pipeline.evaluation.scores import (
    age_metrics,
    classification_metrics,
    combine_views,
    predictions,
)
from pipeline.heads.calibration import (
    N_BINS,
    calibration_bins,
    expected_calibration_error,
)

NAMES = ["0-25", "26-50", "51-75", "76-116"]

# true group, probabilities.  prediction / confidence / ECE bin (15 bins of width 1/15):
Y_TRUE = np.array([0, 0, 1, 1, 2, 3])
Y_PROB = np.array([
    [0.90, 0.04, 0.03, 0.03],   # pred 0, right, conf 0.90 -> bin 13 (0.867, 0.933]
    [0.30, 0.62, 0.04, 0.04],   # pred 1, wrong, conf 0.62 -> bin 9  (0.600, 0.667]
    [0.04, 0.88, 0.04, 0.04],   # pred 1, right, conf 0.88 -> bin 13
    [0.20, 0.50, 0.20, 0.10],   # pred 1, right, conf 0.50 -> bin 7  (0.467, 0.533]
    [0.05, 0.11, 0.20, 0.64],   # pred 3, wrong, conf 0.64 -> bin 9
    [0.25, 0.45, 0.10, 0.20],   # pred 1, wrong, conf 0.45 -> bin 6  (0.400, 0.467]
])


def test_group_metrics_match_hand_computation():
    m = classification_metrics(Y_TRUE, Y_PROB, NAMES)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)                      # rows 0, 2, 3
    # recall per group: 1/2, 2/2, 0/1, 0/1
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    # precision: group 0 1/1, group 1 2/4, group 2 never predicted, group 3 0/1
    pg = m["per_group"]
    assert pg["51-75"]["precision"] is None
    assert pg["0-25"]["precision"] == pytest.approx(1.0)
    assert pg["26-50"]["precision"] == pytest.approx(0.5)
    assert pg["76-116"]["precision"] == pytest.approx(0.0)
    assert [pg[n]["recall"] for n in NAMES] == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert [pg[n]["support"] for n in NAMES] == [2, 2, 1, 1]
    # F1: group 0 2*1*.5/1.5 = 2/3, group 1 2*.5*1/1.5 = 2/3, groups 2 and 3 0 -> macro 1/3
    assert m["macro_f1"] == pytest.approx(1 / 3)
    # |pred - true| = 0, 1, 0, 0, 1, 2
    assert m["off_by_one"] == pytest.approx(5 / 6)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]


def test_ece_with_hand_worked_bins():
    bins = calibration_bins(Y_TRUE, Y_PROB)
    assert len(bins["count"]) == N_BINS == 15
    expected_counts = [0] * 15
    expected_counts[6], expected_counts[7], expected_counts[9], expected_counts[13] = 1, 1, 2, 2
    assert bins["count"] == expected_counts
    assert bins["accuracy"][13] == pytest.approx(1.0) and bins["confidence"][13] == pytest.approx(0.89)
    assert bins["accuracy"][9] == pytest.approx(0.0) and bins["confidence"][9] == pytest.approx(0.63)
    assert bins["accuracy"][0] is None
    # 2/6 |1 - .89| + 2/6 |0 - .63| + 1/6 |1 - .50| + 1/6 |0 - .45| = 2.43 / 6
    assert bins["ece"] == pytest.approx(2.43 / 6)
    assert expected_calibration_error(Y_TRUE, Y_PROB) == pytest.approx(0.405)
    assert classification_metrics(Y_TRUE, Y_PROB, NAMES)["ece"] == pytest.approx(0.405)


def test_ece_top_bin_and_ties():
    # Confidence 1.0 falls in the last bin (bins are closed on the right); 0.5 in bin 7 (0.467, 0.533].
    prob = np.array([[1.0, 0.0], [0.5, 0.5]])
    bins = calibration_bins([0, 1], prob)
    assert bins["count"][14] == 1 and bins["count"][7] == 1 and sum(bins["count"]) == 2
    # The tie goes to the first group (0), which is wrong: ECE = 1/2 |0 - 0.5| + 1/2 |1 - 1|.
    assert bins["ece"] == pytest.approx(0.25)


def test_perfectly_calibrated_predictions_have_zero_ece():
    # In each bin the accuracy equals the confidence: 4 rows at 0.75 with 3 right.
    prob = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error([0, 0, 0, 1], prob) == pytest.approx(0.0)


def test_age_mae():
    m = age_metrics([20, 30, 60], [25, 28, 70])
    assert m["mae"] == pytest.approx(17 / 3)
    assert m["mean_error"] == pytest.approx(13 / 3)


def test_combine_views_averages_and_can_change_the_prediction():
    views = np.array([[[0.6, 0.4], [0.1, 0.9]],     # plain says 0, mirrored says 1 more strongly
                      [[0.2, 0.8], [0.4, 0.6]]])
    plain = combine_views(views, tta=False)
    both = combine_views(views, tta=True)
    np.testing.assert_allclose(plain, [[0.6, 0.4], [0.2, 0.8]])
    np.testing.assert_allclose(both, [[0.35, 0.65], [0.3, 0.7]])
    assert predictions(plain)[0].tolist() == [0, 1]
    assert predictions(both)[0].tolist() == [1, 1]
    with pytest.raises(ValueError, match="plain, mirrored"):
        combine_views(np.zeros((3, 4)), tta=True)


def test_metrics_are_plain_json_and_undefined_values_are_null():
    m = classification_metrics(Y_TRUE, Y_PROB, NAMES)
    text = json.dumps(m, allow_nan=False)  # raises on NaN / numpy types
    assert json.loads(text) == m
    assert m["per_group"]["51-75"]["precision"] is None


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected \\[N, 4\\]"):
        classification_metrics(Y_TRUE, Y_PROB[:, :3], NAMES)
    with pytest.raises(ValueError, match="6 labels but 5 rows"):
        classification_metrics(Y_TRUE, Y_PROB[:5], NAMES)
    with pytest.raises(ValueError, match="no rows"):
        classification_metrics([], np.zeros((0, 4)), NAMES)


def test_ensemble_mae_leaves_out_rows_without_an_age():
    """Rows labelled with a group only (age -1) have no age error, in an ensemble as in a single head."""
    meta = {"class_names": NAMES, "group_edges": [25, 50, 75, 116], "backbones": ["m"], "weights": {"m": "x"},
            "feature_kind": "last", "target": "age"}

    def member(ages_pred):
        return Evaluation(name="a", checkpoint_path="a", meta=meta, split="test", tta=False, metrics={},
                                  paths=["x", "y", "z"], y_true=Y_TRUE[:3], probs=Y_PROB[:3],
                                  ages_true=np.array([20, -1, 40]), ages_pred=np.asarray(ages_pred, float))

    ensemble = ensemble_evaluation([member([22, 60, 40]), member([18, 80, 44])])
    # mean predictions 20, 70, 42 against 20, (none), 40: errors 0 and 2
    assert ensemble.metrics["mae"] == pytest.approx(1.0)
    assert ensemble.metrics["mean_age_error"] == pytest.approx(1.0)
