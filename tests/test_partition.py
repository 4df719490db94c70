"""Hospital partitions: patient-disjoint, reproducible, test set disjoint, stratification and skew."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fl_unlearn.data.cohort import patient_table, validate_cohort
from fl_unlearn.data.partition import patients_fingerprint, plan_partitions
from fl_unlearn.errors import DataError


def make_cohort(num_patients: int = 200, prevalence: float = 0.3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(num_patients):
        label = int(rng.random() < prevalence)
        for s in range(int(rng.integers(1, 5))):
            rows.append({"patient": f"P{p:04d}", "study": f"P{p:04d}-S{s}", "image": f"P{p:04d}/S{s}.jpg",
                         "label": label, "view": "PA", "split": "test" if p % 5 == 0 else "train",
                         "source": "mimic"})
    return validate_cohort(pd.DataFrame(rows))


@pytest.mark.parametrize("strategy", ["iid", "label-skew", "size-skew"])
def test_partitions_are_patient_disjoint_and_cover_the_cohort(strategy):
    cohort = make_cohort()
    plan = plan_partitions(cohort, num_hospitals=4, strategy=strategy, seed=3)
    groups = [set(h) for h in plan.hospitals] + [set(plan.test)]
    assert plan.is_disjoint()
    assert sum(map(len, groups)) == cohort["patient"].nunique()
    for i in range(4):
        rows = plan.hospital_rows(cohort, i)
        assert set(rows["patient"]) == set(plan.hospitals[i])
        assert not set(rows["patient"]) & set(plan.test)


def test_partitions_are_reproducible_and_depend_on_the_seed():
    cohort = make_cohort()
    a = plan_partitions(cohort, num_hospitals=3, seed=7)
    b = plan_partitions(cohort.sample(frac=1.0, random_state=1), num_hospitals=3, seed=7)
    c = plan_partitions(cohort, num_hospitals=3, seed=8)
    assert a == b  # row order of the table does not matter
    assert a != c


def test_iid_and_test_split_are_stratified_by_patient_label():
    cohort = make_cohort(num_patients=400, prevalence=0.3)
    patients = patient_table(cohort).set_index("patient")["label"]
    overall = patients.mean()
    plan = plan_partitions(cohort, num_hospitals=3, strategy="iid", seed=0, test_fraction=0.25)
    assert len(plan.test) == 100
    assert abs(patients[list(plan.test)].mean() - overall) < 0.02
    for held in plan.hospitals:
        assert abs(patients[list(held)].mean() - overall) < 0.03
    sizes = [len(h) for h in plan.hospitals]
    assert max(sizes) - min(sizes) <= 1


def test_label_skew_and_size_skew_actually_skew():
    cohort = make_cohort(num_patients=400, prevalence=0.5)
    patients = patient_table(cohort).set_index("patient")["label"]
    skew = plan_partitions(cohort, num_hospitals=3, strategy="label-skew", dirichlet_alpha=0.1, seed=0)
    prevalences = [patients[list(h)].mean() for h in skew.hospitals]
    assert max(prevalences) - min(prevalences) > 0.3
    size = plan_partitions(cohort, num_hospitals=3, strategy="size-skew", seed=0)
    sizes = sorted(len(h) for h in size.hospitals)
    assert sizes[-1] > 2 * sizes[0]


def test_source_test_split_and_hospital_cap():
    cohort = make_cohort()
    plan = plan_partitions(cohort, num_hospitals=2, test_split="source", hospital_patients=10, seed=0)
    assert set(plan.test) == set(cohort.loc[cohort["split"] == "test", "patient"])
    assert all(len(h) == 10 for h in plan.hospitals)
    assert plan.reserve and plan.is_disjoint()


def test_summary_has_counts_but_no_patient_ids():
    cohort = make_cohort()
    plan = plan_partitions(cohort, num_hospitals=3, seed=0)
    summary = plan.summary(cohort)
    text = repr(summary)
    assert not any(pid in text for pid in cohort["patient"].unique())
    assert summary["hospitals"][0]["fingerprint"] == patients_fingerprint(list(plan.hospitals[0]))
    assert sum(h["images"] for h in summary["hospitals"]) + summary["test"]["images"] == len(cohort)


def test_more_hospitals_than_patients_is_one_clear_error():
    cohort = make_cohort(num_patients=6)
    with pytest.raises(DataError, match=r"num-hospitals = 10 but only \d+ patient"):
        plan_partitions(cohort, num_hospitals=10, seed=0, test_fraction=0.3)


def test_cohort_validator_names_the_bad_column_or_row():
    cohort = make_cohort(num_patients=5)
    with pytest.raises(DataError, match="missing column.*'label'"):
        validate_cohort(cohort.drop(columns="label"))
    bad = cohort.copy()
    bad.loc[3, "label"] = 2
    with pytest.raises(DataError, match="row 3: label 2 is not 0 or 1"):
        validate_cohort(bad)
    bad = cohort.copy()
    bad.loc[1, "source"] = "kaggle"
    with pytest.raises(DataError, match="row 1: unknown source 'kaggle'"):
        validate_cohort(bad)
    with pytest.raises(DataError, match="no rows"):
        validate_cohort(cohort.iloc[:0])
