"""The audit's plumbing: batched nearest-neighbour search, salted tokens, deletion requests, forget/remain sets."""

from __future__ import annotations

import stat

import numpy as np
import pandas as pd
import pytest

from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.privacy.audit import (
    AuditConfig,
    forget_remain,
    load_or_create_secret,
    nearest_neighbours,
    pairs_grid,
    patient_token,
    read_deletion_requests,
)


def test_batched_search_equals_brute_force():
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(57, 16)), rng.normal(size=(23, 16))

    distances, indices = nearest_neighbours(queries, reference, k=3, batch_size=5)

    brute = np.linalg.norm(queries[:, None] - reference[None], axis=2)
    assert (indices == np.argsort(brute, axis=1)[:, :3]).all()
    assert np.allclose(distances, np.sort(brute, axis=1)[:, :3], atol=1e-5)
    assert nearest_neighbours(queries, reference[:2], k=3)[1].shape == (23, 2)  # k capped by the reference size
    with pytest.raises(DataError, match="empty"):
        nearest_neighbours(queries, reference[:0], k=3)


def test_tokens_are_stable_per_secret_and_differ_across_hospitals(tmp_path):
    secret = load_or_create_secret(tmp_path / "a" / "secret.bin")
    again = load_or_create_secret(tmp_path / "a" / "secret.bin")
    other = load_or_create_secret(tmp_path / "b" / "secret.bin")

    assert secret == again and secret != other
    assert stat.S_IMODE((tmp_path / "a" / "secret.bin").stat().st_mode) == 0o600
    token = patient_token(secret, "P00012")
    assert token == patient_token(again, "P00012") != patient_token(other, "P00012")
    assert len(token) == 16 and "P00012" not in token and "12" != token


def _rows() -> pd.DataFrame:
    return pd.DataFrame({"patient": ["P1", "P1", "P2", "P3", "P3", "P3"], "image": range(6)})


def test_forget_set_holds_every_image_of_linked_and_requested_patients():
    split = forget_remain(_rows(), linked=["P3"], requested=["P1", "P9"], known=["P1", "P2", "P3", "P9"])

    assert split.forget["image"].tolist() == [0, 1, 3, 4, 5]
    assert split.remain["image"].tolist() == [2]
    assert split.patients == ["P1", "P3", "P9"]  # P9 is held here but trained nothing: no images
    assert split.linked == ["P3"] and split.requested == ["P1", "P9"]


def test_unknown_patient_in_a_request_is_an_error_naming_it():
    with pytest.raises(DataError, match="P404"):
        forget_remain(_rows(), linked=[], requested=["P1", "P404"])


def test_deletion_requests_file(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_text("hospital,patient\nhospital-0,P1\nhospital-1,P7\nhospital-0, P2 \n")

    assert read_deletion_requests(path, "hospital-0") == ["P1", "P2"]
    assert read_deletion_requests(path, "hospital-2") == []
    own = tmp_path / "own.csv"
    own.write_text("patient\nP5\n")
    assert read_deletion_requests(own, "hospital-2") == ["P5"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id\nP5\n")
    with pytest.raises(DataError, match="no 'patient' column"):
        read_deletion_requests(bad, "hospital-0")
    with pytest.raises(DataError, match="does not exist"):
        read_deletion_requests(tmp_path / "missing.csv", "hospital-0")


def test_audit_config_is_checked():
    with pytest.raises(ConfigError, match="threshold"):
        AuditConfig(threshold=0.0)
    with pytest.raises(ConfigError, match="top-k"):
        AuditConfig(top_k=0)
    with pytest.raises(ConfigError, match="false-positive"):
        AuditConfig(target_fpr=1.0)


def test_flagged_pairs_grid_puts_the_best_match_first():
    synthetic = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30)])
    real = synthetic + 1

    grid = pairs_grid(synthetic, real, np.array([0.6, 0.9, 0.7]), pad=1)

    assert grid.shape == (9, 14)
    assert grid[0, 0] == 20 and grid[5, 0] == 21  # score 0.9 first, its real match below
