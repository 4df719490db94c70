"""The cohort table: one row per image, the same columns for every data source."""

from __future__ import annotations

import pandas as pd

from fl_unlearn.errors import DataError

#: Required columns, in order. Sources may add more (e.g. the phantom's ``ctr``, ``sex``, ``age``).
COHORT_COLUMNS: tuple[str, ...] = ("patient", "study", "image", "label", "view", "split", "source")
SOURCES: tuple[str, ...] = ("phantom", "mimic", "nih", "chexpert")
SPLITS: tuple[str, ...] = ("train", "validate", "test")


def validate_cohort(table: pd.DataFrame, *, name: str = "cohort table") -> pd.DataFrame:
    """Check the cohort schema and return the table with canonical dtypes.

    Raises
    ------
    DataError
        Naming the first missing column, or the first bad row and value.
    """
    missing = [c for c in COHORT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{name} is missing column(s) {missing}; expected at least {list(COHORT_COLUMNS)}"
        )
    if len(table) == 0:
        raise DataError(f"{name} has no rows: nothing to train on (check the source filters)")
    for col in ("patient", "study", "image"):
        bad = table[col].isna() | (table[col].astype(str).str.len() == 0)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{name} row {row}: column '{col}' is empty")
    labels = pd.to_numeric(table["label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{name} row {row}: label {_show(table['label'].iloc[row])} is not 0 or 1 "
            "(cardiomegaly negative/positive)"
        )
    bad = ~table["source"].isin(SOURCES)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(f"{name} row {row}: unknown source {_show(table['source'].iloc[row])}; expected one of {list(SOURCES)}")
    bad = ~table["split"].isin(SPLITS)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(f"{name} row {row}: unknown split {_show(table['split'].iloc[row])}; expected one of {list(SPLITS)}")
    dup = table["image"].duplicated()
    if dup.any():
        row = int(dup.to_numpy().nonzero()[0][0])
        raise DataError(f"{name} row {row}: image {_show(table['image'].iloc[row])} is listed twice")
    # A study belongs to exactly one patient; a violation means ids were mangled on the way in.
    owners = table.groupby("study")["patient"].nunique()
    if (owners > 1).any():
        study = owners[owners > 1].index[0]
        raise DataError(f"{name}: study {study!r} is assigned to more than one patient")
    out = table.copy()
    out["patient"] = out["patient"].astype(str)
    out["study"] = out["study"].astype(str)
    out["image"] = out["image"].astype(str)
    out["label"] = labels.astype("int64")
    out["view"] = out["view"].astype(str)
    return out.reset_index(drop=True)


def patient_table(cohort: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: image count and the patient-level label (positive at any visit)."""
    grouped = cohort.groupby("patient", sort=True)
    return pd.DataFrame(
        {
            "patient": grouped.size().index.astype(str),
            "images": grouped.size().to_numpy(),
            "label": grouped["label"].max().to_numpy().astype("int64"),
        }
    ).reset_index(drop=True)


def _show(value: object) -> str:
    """A value as a person would write it (no numpy reprs in messages)."""
    if hasattr(value, "item"):
        value = value.item()
    return repr(value) if isinstance(value, str) else str(value)
