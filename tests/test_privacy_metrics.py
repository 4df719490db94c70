"""The anonymization metrics reproduce the paper's Table 1 from its counts, and entanglement behaves."""

from __future__ import annotations

import numpy as np
import pytest

from fl_unlearn.errors import DataError
from fl_unlearn.privacy.entanglement import entanglement_score
from fl_unlearn.privacy.metrics import (
    linked_patients,
    newly_exposed,
    non_anon,
    oda,
    pir,
    pooled_links,
    summary,
    ua,
    ua_image,
)

N = 4000  # the paper's synthetic set


def test_original_model_row_of_table_1():
    flags = np.zeros(N, dtype=bool)
    flags[:885] = True

    assert non_anon(flags) == 885
    assert round(oda(885, N), 1) == 77.9
    assert round(pir(631, N), 1) == 15.8


def test_siss_row_of_table_1():
    forget = {f"p{i}" for i in range(631)}
    still_linked = {f"p{i}" for i in range(631 - 513)}  # 513 of 631 forgotten

    assert round(oda(525, N), 1) == 86.9
    assert round(ua(forget, still_linked), 1) == 81.3


def test_the_other_rows_of_table_1_follow_from_their_counts():
    assert round(oda(602, N), 1) == 85.0  # KL-Away (the paper prints 78.9 as UA; ODA follows from Non-Anon)
    assert round(oda(766, N), 1) == 80.8  # SalUn + KL-Away


def test_newly_exposed_are_linked_after_but_not_in_the_forget_set():
    forget = {"a", "b", "c"}
    after = {"b", "x", "y"}

    assert newly_exposed(forget, after) == {"x", "y"}
    assert ua(forget, after) == pytest.approx(200 / 3)


def test_image_level_ua_pairs_images_by_seed():
    before = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    after = np.array([1, 0, 0, 0, 1, 0], dtype=bool)  # image 4 newly flagged: not part of image-level UA

    assert ua_image(before, after) == 75.0
    with pytest.raises(DataError, match="pairs images by seed"):
        ua_image(before, after[:5])


def test_empty_forget_set_is_fully_unlearned_and_bad_counts_are_errors():
    assert ua(set(), {"x"}) == 100.0
    assert ua_image(np.zeros(3, bool), np.ones(3, bool)) == 100.0
    with pytest.raises(DataError, match="outside"):
        oda(5, 4)
    with pytest.raises(DataError, match="at least one image"):
        pir(1, 0)


def test_summary_and_pooling_count_a_patient_once_per_hospital():
    flags = np.array([True, True, False, True])
    matches = ["t1", "t1", "t2", "t3"]
    linked = linked_patients(matches, flags)

    assert linked == {"t1", "t3"}
    assert summary(4, flags, linked) == {"images": 4, "non_anon": 3, "oda": 25.0, "patients_linked": 2, "pir": 50.0}
    # the same token at two hospitals is two patients (tokens are salted per hospital)
    assert len(pooled_links({"hospital-0": {"t1", "t3"}, "hospital-1": {"t1"}})) == 3


def test_entanglement_is_low_for_separated_sets_and_high_for_mixed_ones():
    rng = np.random.default_rng(0)
    separated = entanglement_score(rng.normal(0, 0.1, (50, 8)), rng.normal(5, 0.1, (80, 8)))
    mixed = entanglement_score(rng.normal(0, 1, (50, 8)), rng.normal(0.05, 1, (80, 8)))

    assert separated["es"] < 0.1 and separated["percent"] < 10
    assert mixed["es"] > 10 and mixed["percent"] > 90
    # ES = 4 (tr Σ_r + tr Σ_f) / ||μ_r − μ_f||²
    f, r = np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([[10.0, 0.0], [12.0, 0.0]])
    assert entanglement_score(f, r)["es"] == pytest.approx(4 * (1 + 1) / 100)
    with pytest.raises(DataError, match="non-empty"):
        entanglement_score(np.empty((0, 2)), r)


def test_pooled_control_counts_images_over_hospitals_with_a_wilson_interval():
    from fl_unlearn.privacy.metrics import pooled_control

    control = pooled_control({"hospital-0": (0, 39), "hospital-1": (1, 40), "hospital-2": (2, 33)})

    assert (control["flagged"], control["images"]) == (3, 112)
    assert control["rate"] == pytest.approx(3 / 112) and control["rate_max"] == pytest.approx(2 / 33)
    assert control["ci_low"] == pytest.approx(0.0092, abs=1e-4) and control["ci_high"] == pytest.approx(0.0758, abs=1e-4)
    assert pooled_control({})["images"] == 0
