"""Central evaluation: AUC as scikit-learn computes it, FID as pytorch-fid computes it, the report's pieces."""

from __future__ import annotations

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance
from sklearn.metrics import roc_auc_score

from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.evaluation import fid
from fl_unlearn.evaluation.metrics import auc_with_ci
from fl_unlearn.evaluation.report import before_after_grid, markdown_table, privacy_utility_plot
from fl_unlearn.evaluation.utility import utility_auc
from fl_unlearn.models.classifier import build_classifier
from fl_unlearn.training.classifier import ClassifierTrainConfig, features


def test_auc_equals_scikit_learn_and_its_interval_holds_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = labels + rng.normal(0, 1.0, 300)

    result = auc_with_ci(labels, scores)

    assert result["auc"] == roc_auc_score(labels, scores)
    assert result["ci_low"] < result["auc"] < result["ci_high"]


def test_fid_is_zero_for_the_same_set_grows_with_a_shift_and_is_pytorch_fids():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(400, 16)) + 0.5

    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid.frechet_distance(a, b) > fid.frechet_distance(a, a + 0.1) > 0.0
    expected = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(DataError, match="at least 2"):
        fid.frechet_distance(a[:1], b)


def test_standard_fid_needs_the_local_weights_file_and_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*domain features"):
        fid.inception_extractor(tmp_path / "pt_inception.pth")


def test_domain_features_are_the_classifiers_penultimate_layer():
    model = build_classifier("small-cnn")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)

    assert features(model, images).shape == (5, 64)


def test_utility_classifier_learns_a_visible_label_and_rejects_one_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    images = np.where(labels[:, None, None] == 1, 200, 60).astype(np.uint8) + rng.integers(0, 20, (120, 32, 32),
                                                                                         dtype=np.uint8)
    result = utility_auc(images[:80], labels[:80], images[80:], labels[80:], backbone="small-cnn",
                         config=ClassifierTrainConfig(steps=30, batch_size=16))
    assert result["auc"] > 0.9 and result["train_images"] == 80
    with pytest.raises(DataError, match="one class"):
        utility_auc(images[:10], np.zeros(10), images[80:], labels[80:], backbone="small-cnn",
                    config=ClassifierTrainConfig(steps=1))


def test_report_table_plot_and_grid():
    rows = [{"method": "original", "non_anon": 5, "ua": None, "oda": 99.0, "pir": 1.0, "auc": 0.9, "fid": 10.0},
            {"method": "kl-away", "non_anon": 1, "ua": 80.0, "oda": 99.8, "pir": 0.2, "auc": 0.85, "fid": 20.0},
            {"method": "real", "auc": 0.95}]
    table = markdown_table(rows)
    assert "| KL-Away | 1 | 80.0 |" in table and "| Real data | – |" in table
    assert privacy_utility_plot(rows, fid.DOMAIN)[:8] == b"\x89PNG\r\n\x1a\n"
    before = np.zeros((3, 4, 4), np.uint8)
    grid = before_after_grid(before, {"kl-away": before + 9}, count=3, pad=1)
    assert grid.shape == (9, 14) and grid[5, 0] == 9


def test_mark_retention_is_one_through_identity_and_low_through_a_blur():
    from scipy.ndimage import uniform_filter

    from fl_unlearn.data.phantom import PhantomConfig, generate_phantom
    from fl_unlearn.evaluation.marks import mark_retention, render_pair

    phantom = PhantomConfig(num_patients=40, image_size=64, max_images_per_patient=3)
    table, pixels = generate_phantom(phantom)
    row, pair = next((r, p) for r in table.itertuples()
                     if (p := render_pair(phantom, int(r.patient[1:]), r.visit, "granulomas")) is not None)
    np.testing.assert_array_equal(pair[0], pixels[row.Index])  # "with" is the cohort's own image
    assert (pair[0] != pair[1]).any()
    kept = mark_retention(lambda x: x, table, phantom, "granulomas")
    assert kept["studies"] > 5 and kept["kept"] == 1.0 and kept["median_retention"] == 1.0
    blurred = mark_retention(lambda x: uniform_filter(x, size=(1, 5, 5)), table, phantom, "granulomas")
    assert blurred["studies"] == kept["studies"] and blurred["kept"] < 0.2
    devices = mark_retention(lambda x: x, table, phantom, "device")
    assert devices["studies"] == 0 or devices["kept"] == 1.0
    with pytest.raises(DataError, match="unknown mark"):
        mark_retention(lambda x: x, table, phantom, "tattoo")
