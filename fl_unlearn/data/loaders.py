"""Loaders that turn local MIMIC-CXR-JPG, ChestX-ray14 and CheXpert folders into cohort tables."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fl_unlearn.data.cohort import COHORT_COLUMNS, validate_cohort
from fl_unlearn.errors import ConfigError, DataError

#: How an uncertain (-1.0) Cardiomegaly label is handled: dropped, or mapped to 0 or 1.
LABEL_POLICIES: tuple[str, ...] = ("drop", "u-zeros", "u-ones")
_UNCERTAIN_AS = {"drop": np.nan, "u-zeros": 0.0, "u-ones": 1.0}

_MIMIC_METADATA = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
_MIMIC_CHEXPERT = ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-chexpert.csv.gz")
_MIMIC_SPLIT = ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
_MIMIC_EXPECTED = (
    "mimic-cxr-2.0.0-metadata.csv(.gz), mimic-cxr-2.0.0-chexpert.csv(.gz), "
    "mimic-cxr-2.0.0-split.csv(.gz) and files/p10/p10000032/s50414267/<dicom_id>.jpg ..."
)
# The 2020 file corrects patient ages; findings and views are the same in both.
_NIH_ENTRY = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_NIH_EXPECTED = (
    "Data_Entry_2017.csv or Data_Entry_2017_v2020.csv, optionally test_list.txt, "
    "and PNGs in images/ or images_001/images/ ... images_012/images/"
)
_CHEXPERT_CSVS = (("train.csv", "train"), ("valid.csv", "validate"))
_CHEXPERT_EXPECTED = (
    "train.csv and/or valid.csv, either directly or inside CheXpert-v1.0-small/, "
    "next to the train/ and valid/ image folders"
)
_CSV_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError)


@dataclass(frozen=True, eq=False)
class LoadResult:
    """A validated cohort table, the folder its relative ``image`` paths start from, and raw counts.

    ``stats`` holds ``images_total`` (metadata rows), ``images_pa`` (PA rows),
    ``images_dropped_label`` (PA rows dropped for an uncertain or missing label),
    ``patients`` and ``images`` (rows kept in ``table``).
    """

    table: pd.DataFrame
    root: Path
    stats: dict[str, int]


def load_mimic(root: str | Path, label_policy: str = "drop", missing_as_negative: bool = False) -> LoadResult:
    """Load MIMIC-CXR-JPG v2.x: PA views, Cardiomegaly from the CheXpert labeler, official split.

    ``patient`` is ``subject_id``, ``study`` is ``study_id`` and ``image`` is
    ``files/p<first two digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``. Uncertain (-1.0) and
    missing labels are dropped unless ``label_policy`` ("u-zeros", "u-ones") or
    ``missing_as_negative`` say otherwise; a study absent from the label file counts as missing.
    """
    _check_label_policy(label_policy)
    root = _check_root(root, "MIMIC-CXR-JPG", _MIMIC_EXPECTED)
    meta_path = _require_file(root, _MIMIC_METADATA, "MIMIC-CXR-JPG", _MIMIC_EXPECTED)
    labels_path = _require_file(root, _MIMIC_CHEXPERT, "MIMIC-CXR-JPG", _MIMIC_EXPECTED)
    split_path = _require_file(root, _MIMIC_SPLIT, "MIMIC-CXR-JPG", _MIMIC_EXPECTED)

    meta = _read_csv(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    _require_values(meta, ["dicom_id", "subject_id", "study_id"], meta_path)
    bad = ~meta["subject_id"].str.fullmatch(r"\d+")
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{meta_path} line {i + 2}: subject_id {meta['subject_id'].iloc[i]!r} is not a number; "
            "MIMIC image paths are built from numeric subject ids"
        )
    total = len(meta)
    pa = meta[_normalised(meta["ViewPosition"]) == "PA"]
    if pa.empty:
        raise DataError(
            f"{meta_path}: none of the {total} rows has ViewPosition 'PA' "
            f"(values seen: {_values_seen(meta['ViewPosition'])}); the cohort uses PA views only"
        )

    labels = _read_csv(labels_path, ["subject_id", "study_id", "Cardiomegaly"])
    _require_values(labels, ["subject_id", "study_id"], labels_path)
    dup = labels.duplicated(["subject_id", "study_id"])
    if dup.any():
        i = _first(dup)
        raise DataError(
            f"{labels_path} line {i + 2}: subject {labels['subject_id'].iloc[i]}, study "
            f"{labels['study_id'].iloc[i]} is listed twice; keep one label row per study"
        )

    def describe_label_row(i: int) -> str:
        subject, study = labels["subject_id"].iloc[i], labels["study_id"].iloc[i]
        return f"{labels_path} line {i + 2} (subject {subject}, study {study})"

    labels["label"] = _cardiomegaly_labels(
        labels["Cardiomegaly"], describe_label_row, label_policy, missing_as_negative
    )
    pa = pa.merge(
        labels[["subject_id", "study_id", "label"]],
        on=["subject_id", "study_id"],
        how="left",
        indicator="_labelled",
    )
    if missing_as_negative:
        pa.loc[pa["_labelled"] == "left_only", "label"] = 0.0
    kept, dropped = _drop_unlabelled(pa, meta_path, label_policy, missing_as_negative)

    splits = _read_csv(split_path, ["dicom_id", "split"])
    _require_values(splits, ["dicom_id", "split"], split_path)
    dup = splits["dicom_id"].duplicated()
    if dup.any():
        i = _first(dup)
        raise DataError(
            f"{split_path} line {i + 2}: dicom_id {splits['dicom_id'].iloc[i]} is listed twice; "
            "each image needs exactly one split"
        )
    bad = ~splits["split"].isin(["train", "validate", "test"])
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{split_path} line {i + 2}: split {splits['split'].iloc[i]!r} is not one of 'train', 'validate', 'test'"
        )
    kept = kept.merge(splits, on="dicom_id", how="left")
    unsplit = kept["split"].isna()
    if unsplit.any():
        dicom = kept["dicom_id"].iloc[_first(unsplit)]
        raise DataError(
            f"{int(unsplit.sum())} PA image(s) have no row in {split_path}, the first is dicom_id "
            f"{dicom}; use the split file that belongs to {meta_path.name}"
        )

    subject, study = kept["subject_id"], kept["study_id"]
    # Images live in files/ beside the CSVs; fall back to root/files/ when the CSVs were put apart.
    dataset_dir = meta_path.parent
    if not (dataset_dir / "files").is_dir() and (root / "files").is_dir():
        dataset_dir = root
    prefix = _relative_prefix(root, dataset_dir)
    image = prefix + "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + kept["dicom_id"] + ".jpg"
    table = pd.DataFrame(
        {
            "patient": subject,
            "study": study,
            "image": image,
            "label": kept["label"],
            "view": "PA",
            "split": kept["split"],
            "source": "mimic",
        }
    )
    return _result(table, root, "MIMIC-CXR-JPG", total, len(pa), dropped)


def load_nih(root: str | Path) -> LoadResult:
    """Load NIH ChestX-ray14: PA views, label 1 when "Finding Labels" lists Cardiomegaly.

    ``patient`` is "Patient ID", ``study`` is ``<Patient ID>_<Follow-up #>``. Images are found in
    ``images/`` or the Kaggle ``images_0NN/images/`` folders; one that is not on disk is listed as
    ``images/<Image Index>``. Names in ``test_list.txt`` form the test split, the rest train.
    """
    root = _check_root(root, "ChestX-ray14", _NIH_EXPECTED)
    entry_path = _require_file(root, _NIH_ENTRY, "ChestX-ray14", _NIH_EXPECTED)
    entries = _read_csv(entry_path, ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"])
    _require_values(entries, list(entries.columns), entry_path)
    total = len(entries)
    pa = entries[_normalised(entries["View Position"]) == "PA"]
    if pa.empty:
        raise DataError(
            f"{entry_path}: none of the {total} rows has View Position 'PA' "
            f"(values seen: {_values_seen(entries['View Position'])}); the cohort uses PA views only"
        )

    names = pa["Image Index"].str.strip()
    on_disk = _index_files(root, ".png")
    test_path = _find_file(root, ("test_list.txt",))
    test_names = set(test_path.read_text().split()) if test_path is not None else set()
    patient = pa["Patient ID"].str.strip()
    table = pd.DataFrame(
        {
            "patient": patient,
            "study": patient + "_" + pa["Follow-up #"].str.strip(),
            "image": ("images/" + names).mask(names.isin(list(on_disk)), names.map(on_disk)),
            "label": pa["Finding Labels"]
            .str.contains(r"(?:^|\|)\s*Cardiomegaly\s*(?:\||$)", regex=True)
            .astype("int64"),
            "view": "PA",
            "split": np.where(names.isin(test_names), "test", "train"),
            "source": "nih",
        }
    )
    return _result(table, root, "ChestX-ray14", total, len(pa), 0)


def load_chexpert(root: str | Path, label_policy: str = "drop", missing_as_negative: bool = False) -> LoadResult:
    """Load CheXpert (v1.0 or v1.0-small): frontal PA views, same label policy as :func:`load_mimic`.

    ``root`` is the folder that contains ``CheXpert-v1.0-small/`` or that folder itself.
    ``patient`` is ``patient00001``, ``study`` is ``patient00001_study1``; ``valid.csv`` rows form
    the "validate" split, ``train.csv`` rows "train".
    """
    _check_label_policy(label_policy)
    root = _check_root(root, "CheXpert", _CHEXPERT_EXPECTED)
    csv_dir = next(
        (d for d in _candidate_dirs(root) if any((d / n).is_file() for n, _ in _CHEXPERT_CSVS)),
        None,
    )
    if csv_dir is None:
        raise DataError(
            f"CheXpert root {root} holds neither train.csv nor valid.csv (looked in the folder and "
            f"its direct subfolders); expected {_CHEXPERT_EXPECTED}"
        )

    frames = []
    for name, split in _CHEXPERT_CSVS:
        path = csv_dir / name
        if not path.is_file():
            continue
        rows = _read_csv(path, ["Path", "Frontal/Lateral", "AP/PA", "Cardiomegaly"])
        _require_values(rows, ["Path"], path)

        def describe_row(i: int, rows: pd.DataFrame = rows, path: Path = path) -> str:
            return f"{path} line {i + 2} (Path {rows['Path'].iloc[i]})"

        rows["label"] = _cardiomegaly_labels(rows["Cardiomegaly"], describe_row, label_policy, missing_as_negative)
        rows["split"] = split
        rows["_line"] = np.arange(len(rows)) + 2
        rows["_file"] = str(path)
        frames.append(rows)
    rows = pd.concat(frames, ignore_index=True)
    total = len(rows)
    is_pa = (_normalised(rows["Frontal/Lateral"]) == "FRONTAL") & (_normalised(rows["AP/PA"]) == "PA")
    pa = rows[is_pa]
    if pa.empty:
        raise DataError(
            f"none of the {total} rows in {csv_dir} train.csv/valid.csv is a frontal PA view "
            "(Frontal/Lateral 'Frontal' and AP/PA 'PA'); the cohort uses PA views only"
        )
    kept, dropped = _drop_unlabelled(pa, csv_dir, label_policy, missing_as_negative)

    ids = kept["Path"].str.extract(r"(?:^|/)(patient\d+)/(study\d+)/")
    bad = ids[0].isna()
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{kept['_file'].iloc[i]} line {kept['_line'].iloc[i]}: Path {kept['Path'].iloc[i]!r} "
            "does not contain '<patientNNNNN>/<studyN>/'"
        )
    table = pd.DataFrame(
        {
            "patient": ids[0],
            "study": ids[0] + "_" + ids[1],
            "image": _chexpert_image_paths(kept["Path"], root, csv_dir),
            "label": kept["label"],
            "view": "PA",
            "split": kept["split"],
            "source": "chexpert",
        }
    )
    return _result(table, root, "CheXpert", total, len(pa), dropped)


LOADERS: dict[str, Callable[..., LoadResult]] = {
    "mimic": load_mimic,
    "nih": load_nih,
    "chexpert": load_chexpert,
}


def missing_images(result: LoadResult) -> list[str]:
    """The table's relative image paths that have no file under ``result.root``."""
    return [p for p in result.table["image"] if not (result.root / p).is_file()]


def _check_label_policy(label_policy: str) -> None:
    if label_policy not in LABEL_POLICIES:
        raise ConfigError(f"label_policy {label_policy!r} is unknown; use one of {list(LABEL_POLICIES)}")


def _check_root(root: str | Path, dataset: str, expected: str) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DataError(f"{dataset} root {path} does not exist; expected a folder holding {expected}")
    if not path.is_dir():
        raise DataError(f"{dataset} root {path} is not a folder; expected a folder holding {expected}")
    if next(path.iterdir(), None) is None:
        raise DataError(f"{dataset} root {path} is empty; expected {expected}")
    return path


def _candidate_dirs(root: Path) -> list[Path]:
    # Metadata sits at the top of a download, or one level down when the archive made its own folder.
    return [root, *sorted(p for p in root.iterdir() if p.is_dir())]


def _find_file(root: Path, names: Sequence[str]) -> Path | None:
    for folder in _candidate_dirs(root):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _require_file(root: Path, names: Sequence[str], dataset: str, expected: str) -> Path:
    path = _find_file(root, names)
    if path is None:
        raise DataError(
            f"{dataset} root {root} has no {names[0]} (looked for {' or '.join(names)} in the "
            f"folder and its direct subfolders); expected {expected}"
        )
    return path


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """Read only ``required`` columns, as strings so ids keep leading zeros and labels stay exact."""
    try:
        header = pd.read_csv(path, nrows=0).columns
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{path} has no column(s) {missing}; found {list(header)}. "
                "Use the unmodified file from the dataset release"
            )
        return pd.read_csv(path, usecols=required, dtype=str)
    except _CSV_ERRORS as exc:
        raise DataError(f"{path} cannot be read as CSV ({type(exc).__name__}: {exc})") from exc


def _require_values(rows: pd.DataFrame, columns: list[str], path: Path) -> None:
    for col in columns:
        empty = rows[col].isna() | (rows[col].str.strip() == "")
        if empty.any():
            raise DataError(f"{path} line {_first(empty) + 2}: column {col!r} is empty")


def _cardiomegaly_labels(
    raw: pd.Series, describe_row: Callable[[int], str], label_policy: str, missing_as_negative: bool
) -> pd.Series:
    """Map CheXpert-labeler values (1.0, 0.0, -1.0, empty) to 1.0/0.0, or NaN for rows to drop."""
    text = raw.str.strip()
    missing = text.isna() | (text == "")
    value = pd.to_numeric(text.where(~missing), errors="coerce")
    bad = ~missing & ~value.isin([1.0, 0.0, -1.0])
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{describe_row(i)}: Cardiomegaly value {raw.iloc[i]!r} is not 1.0, 0.0, -1.0 or empty; "
            "fix the row or use the unmodified label file"
        )
    label = value.where(value != -1.0, _UNCERTAIN_AS[label_policy])
    if missing_as_negative:
        label = label.where(~missing, 0.0)
    return label


def _drop_unlabelled(
    pa: pd.DataFrame, where: Path, label_policy: str, missing_as_negative: bool
) -> tuple[pd.DataFrame, int]:
    keep = pa["label"].notna()
    if not keep.any():
        raise DataError(
            f"all {len(pa)} PA images in {where} were dropped for an uncertain (-1.0) or missing "
            f"Cardiomegaly label (label_policy={label_policy!r}, "
            f"missing_as_negative={missing_as_negative}); keep them with label_policy='u-zeros' or "
            "'u-ones' and/or missing_as_negative=True"
        )
    return pa[keep], int((~keep).sum())


def _relative_prefix(root: Path, folder: Path) -> str:
    """``folder`` relative to ``root`` with a trailing '/', or "" for root itself."""
    rel = folder.relative_to(root).as_posix()
    return "" if rel == "." else rel + "/"


def _chexpert_image_paths(paths: pd.Series, root: Path, csv_dir: Path) -> pd.Series:
    # CSV paths start with the release folder ("CheXpert-v1.0-small/train/..."). The CSVs ship
    # inside that folder, so strip it, unless a copy of the CSV sits beside the folder.
    parts = paths.str.split("/", n=1)
    first, rest = parts.str[0], parts.str[1]
    strip = {name: name.lower().startswith("chexpert") and not (csv_dir / name).is_dir() for name in first.unique()}
    return _relative_prefix(root, csv_dir) + paths.where(~first.map(strip).astype(bool), rest)


def _index_files(root: Path, suffix: str) -> dict[str, str]:
    """File name -> path relative to ``root`` for every ``suffix`` file, from one directory walk."""
    index: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        for name in files:
            if name.lower().endswith(suffix):
                index.setdefault(name, (rel / name).as_posix())
    return index


def _normalised(values: pd.Series) -> pd.Series:
    return values.str.strip().str.upper()


def _values_seen(values: pd.Series) -> list[str]:
    return sorted(values.dropna().astype(str).unique().tolist())[:10]


def _first(mask: pd.Series) -> int:
    return int(mask.to_numpy().nonzero()[0][0])


def _result(table: pd.DataFrame, root: Path, dataset: str, total: int, pa: int, dropped: int) -> LoadResult:
    table = validate_cohort(table.reset_index(drop=True)[list(COHORT_COLUMNS)], name=f"{dataset} cohort from {root}")
    stats = {
        "images_total": int(total),
        "images_pa": int(pa),
        "images_dropped_label": int(dropped),
        "patients": int(table["patient"].nunique()),
        "images": len(table),
    }
    return LoadResult(table=table, root=root, stats=stats)
