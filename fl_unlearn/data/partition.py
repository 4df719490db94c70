"""Patient-disjoint hospital partitions and a central held-out test set, deterministic from a seed."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import datasets
import numpy as np
import pandas as pd
from flwr_datasets.partitioner import DirichletPartitioner, ExponentialPartitioner, IidPartitioner, Partitioner
from sklearn.model_selection import train_test_split

from fl_unlearn.data.cohort import patient_table
from fl_unlearn.errors import DataError

datasets.disable_progress_bars()


def hospital_name(index: int) -> str:
    return f"hospital-{index}"


def patients_fingerprint(patients: list[str] | tuple[str, ...]) -> str:
    """A short hash of a patient set: lets a hospital prove it holds the planned partition without sending ids."""
    digest = hashlib.sha256("\n".join(sorted(patients)).encode()).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class PartitionPlan:
    """Which patients each hospital holds, which form the central test set, and which are unused."""

    hospitals: tuple[tuple[str, ...], ...]
    test: tuple[str, ...]
    reserve: tuple[str, ...] = ()

    @property
    def num_hospitals(self) -> int:
        return len(self.hospitals)

    def hospital_rows(self, cohort: pd.DataFrame, index: int) -> pd.DataFrame:
        return cohort[cohort["patient"].isin(set(self.hospitals[index]))].reset_index(drop=True)

    def test_rows(self, cohort: pd.DataFrame) -> pd.DataFrame:
        return cohort[cohort["patient"].isin(set(self.test))].reset_index(drop=True)

    def is_disjoint(self) -> bool:
        groups = [set(h) for h in self.hospitals] + [set(self.test), set(self.reserve)]
        return sum(len(g) for g in groups) == len(set().union(*groups))

    def summary(self, cohort: pd.DataFrame) -> dict:
        """Counts only, never patient ids: safe for a manifest or a log."""
        hospitals = [
            {"hospital": hospital_name(i), **describe_rows(self.hospital_rows(cohort, i)),
             "fingerprint": patients_fingerprint(self.hospitals[i])}
            for i in range(self.num_hospitals)
        ]
        return {
            "hospitals": hospitals,
            "test": {**describe_rows(self.test_rows(cohort)), "fingerprint": patients_fingerprint(self.test)},
            "reserve_patients": len(self.reserve),
            "disjoint": self.is_disjoint(),
        }


def describe_rows(rows: pd.DataFrame) -> dict:
    """Patient, image and label counts of a slice of the cohort table."""
    n = len(rows)
    return {
        "patients": int(rows["patient"].nunique()),
        "images": n,
        "positives": int(rows["label"].sum()) if n else 0,
        "prevalence": round(float(rows["label"].mean()), 4) if n else 0.0,
    }


def plan_partitions(
    cohort: pd.DataFrame,
    *,
    num_hospitals: int,
    strategy: str = "iid",
    seed: int = 0,
    test_fraction: float = 0.3,
    test_split: str = "random",
    dirichlet_alpha: float = 0.5,
    hospital_patients: int = 0,
) -> PartitionPlan:
    """Split a validated cohort into ``num_hospitals`` patient-disjoint hospitals and a test set.

    The test set is drawn first (stratified by the patient-level label, or the source's own
    ``split == "test"``); hospitals then split the remaining patients with a flwr-datasets
    partitioner: ``iid`` (label-stratified shards), ``label-skew`` (Dirichlet over labels, α =
    ``dirichlet_alpha``) or ``size-skew`` (exponentially growing hospital sizes).
    ``hospital_patients`` > 0 caps each hospital; patients left over form the reserve.
    """
    if num_hospitals < 1:
        raise DataError(f"num-hospitals = {num_hospitals} must be at least 1")
    patients = patient_table(cohort)
    rng = np.random.default_rng(seed)

    if test_split == "source":
        test_ids = set(cohort.loc[cohort["split"] == "test", "patient"])
        mixed = test_ids & set(cohort.loc[cohort["split"] != "test", "patient"])
        if mixed:
            raise DataError(
                f"test-split = 'source' but {len(mixed)} patient(s) have images in both the test and "
                "another split; use test-split = 'random'"
            )
        test = patients[patients["patient"].isin(test_ids)]
        pool = patients[~patients["patient"].isin(test_ids)]
    elif test_fraction > 0:
        n_test = round(test_fraction * len(patients))
        if n_test == 0 or n_test >= len(patients):
            raise DataError(
                f"test-fraction = {test_fraction} of {len(patients)} patients leaves an empty test set or no hospital patients"
            )
        counts = patients["label"].value_counts()
        stratify = patients["label"] if counts.min() >= 2 and n_test >= len(counts) else None
        pool, test = train_test_split(patients, test_size=n_test, random_state=seed, stratify=stratify)
    else:
        test, pool = patients.iloc[:0], patients

    if len(pool) < num_hospitals:
        raise DataError(
            f"num-hospitals = {num_hospitals} but only {len(pool)} patient(s) remain for hospitals "
            f"after the test split ({len(patients)} patients in the cohort)"
        )
    pool = pool.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)
    pool = _interleave_by_label(pool)
    ds = datasets.Dataset.from_pandas(pool[["patient", "label", "images"]], preserve_index=False)
    partitioner = _make_partitioner(strategy, num_hospitals, dirichlet_alpha, seed, len(pool))
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():  # Dirichlet warns on every resample; a final failure raises below
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            hospitals = [list(partitioner.load_partition(i)["patient"]) for i in range(num_hospitals)]
    except ValueError as exc:  # flwr-datasets explains why (e.g. Dirichlet could not meet the minimum size)
        raise DataError(f"partition-strategy = '{strategy}' failed for {len(pool)} patients: {exc}") from None

    reserve: list[str] = []
    if hospital_patients > 0:
        for i, held in enumerate(hospitals):
            hospitals[i], extra = held[:hospital_patients], held[hospital_patients:]
            reserve.extend(extra)
    for i, held in enumerate(hospitals):
        if not held:
            raise DataError(
                f"{hospital_name(i)} received no patients under partition-strategy = '{strategy}'; "
                "use fewer hospitals, more patients or a larger dirichlet-alpha"
            )
    return PartitionPlan(
        hospitals=tuple(tuple(sorted(h)) for h in hospitals),
        test=tuple(sorted(test["patient"])),
        reserve=tuple(sorted(reserve)),
    )


def _interleave_by_label(pool: pd.DataFrame) -> pd.DataFrame:
    """Order patients so that every contiguous block has the pool's label mix (stratified iid shards)."""
    rank = pool.groupby("label").cumcount()
    size = pool.groupby("label")["label"].transform("size")
    key = (rank + 0.5) / size
    return pool.assign(_key=key).sort_values(["_key", "label"], kind="stable").drop(columns="_key").reset_index(drop=True)


def _make_partitioner(strategy: str, n: int, alpha: float, seed: int, n_patients: int) -> Partitioner:
    if strategy == "iid":
        return IidPartitioner(num_partitions=n)
    if strategy == "label-skew":
        return DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=alpha,
            min_partition_size=max(1, min(10, n_patients // (4 * n))), self_balancing=True, seed=seed,
        )
    if strategy == "size-skew":
        return ExponentialPartitioner(num_partitions=n)
    raise DataError(f"unknown partition-strategy {strategy!r}; expected iid, label-skew or size-skew")


@dataclass(frozen=True)
class HospitalSplit:
    """A hospital's own patients, split locally: training (autoencoder, re-ID), the generative subset, and holdout."""

    train: pd.DataFrame
    ldm: pd.DataFrame
    holdout: pd.DataFrame


def split_hospital(rows: pd.DataFrame, *, seed: int, holdout_fraction: float, ldm_patients: int) -> HospitalSplit:
    """Deterministic local split by patient.

    ``holdout`` patients never train anything (they validate and calibrate the re-identification
    networks, and are the unseen patients of the false-positive control). The LDM is trained on
    ``ldm_patients`` of the remaining patients (0 = all of them): memorization is strong for small
    cohorts, as at a small clinical site.
    """
    patients = np.array(sorted(rows["patient"].unique()))
    order = np.random.default_rng([seed, 104729]).permutation(len(patients))
    patients = patients[order]
    n_holdout = round(holdout_fraction * len(patients))
    if len(patients) - n_holdout < 1:
        raise DataError(f"a hospital with {len(patients)} patient(s) keeps none for training at "
                        f"hospital-holdout-fraction = {holdout_fraction}")
    holdout, train = set(patients[:n_holdout]), patients[n_holdout:]
    ldm = set(train[:ldm_patients]) if ldm_patients > 0 else set(train)
    pick = lambda ids: rows[rows["patient"].isin(ids)].reset_index(drop=True)
    return HospitalSplit(train=pick(set(train)), ldm=pick(ldm), holdout=pick(holdout))
