"""`python -m fl_unlearn.data inspect|preview`: counts before training, on metadata alone, and the preview grid."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from fl_unlearn.config import load_preset
from fl_unlearn.data.__main__ import main
from fl_unlearn.data.inspect import preview_grid
from fl_unlearn.data.sources import load_cohort


def write_mimic_metadata(root, subjects: int = 30) -> int:
    """MIMIC-CXR-JPG CSVs for ``subjects`` patients (2 PA + 1 lateral image each), without image files."""
    meta, labels, split = [], [], []
    for i in range(subjects):
        subject = f"1{i:07d}"
        for s in range(2):
            study = f"5{i:05d}{s:02d}"
            labels.append({"subject_id": subject, "study_id": study, "Cardiomegaly": ["1.0", "0.0", "-1.0"][(i + s) % 3]})
            for view in ("PA", "LATERAL"):
                dicom = f"{subject}-{study}-{view}"
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                             "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "Rows": 3056,
                             "Columns": 2544, "StudyDate": "21800506", "StudyTime": "213014.531",
                             "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                             "ViewCodeSequence_CodeMeaning": "postero-anterior",
                             "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": "train"})
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(labels).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    kept = sum(1 for row in labels if row["Cardiomegaly"] != "-1.0")
    return kept


def test_inspect_on_a_metadata_only_folder_prints_counts_and_missing_images(tmp_path, capsys):
    kept = write_mimic_metadata(tmp_path / "mimic")

    code = main(["inspect", "--source", "mimic", "--root", str(tmp_path / "mimic"), "--num-hospitals", "3"])

    out = capsys.readouterr().out
    assert code == 0
    assert "images in metadata      120" in out
    assert "PA images               60" in out
    assert f"images kept             {kept}" in out
    assert f"missing image files     {kept} of {kept}" in out
    assert "hospital-2" in out and "central test" in out


def test_inspect_json_report_is_consistent(tmp_path, capsys):
    write_mimic_metadata(tmp_path / "mimic")
    assert main(["inspect", "--json", "--source", "mimic", "--root", str(tmp_path / "mimic")]) == 0
    report = json.loads(capsys.readouterr().out)
    part = report["partition"]
    assert part["disjoint"] is True
    assert sum(h["images"] for h in part["hospitals"]) + part["test"]["images"] == report["images"]
    assert report["missing_image_files"] == report["images"]


def test_inspect_reports_an_impossible_partition_without_failing(tmp_path, capsys):
    write_mimic_metadata(tmp_path / "mimic", subjects=4)
    assert main(["inspect", "--source", "mimic", "--root", str(tmp_path / "mimic"), "--num-hospitals", "9"]) == 0
    assert "cannot partition: num-hospitals = 9" in capsys.readouterr().out


def test_inspect_bad_source_or_empty_folder_is_one_clear_error(tmp_path, capsys):
    assert main(["inspect", "--source", "kaggle"]) == 2
    assert "data-source = 'kaggle' is not one of" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", "--source", "nih", "--root", str(tmp_path / "empty")]) == 2
    assert "error:" in capsys.readouterr().err


def test_preview_writes_a_patients_by_visits_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["preview", "--source", "phantom", "--preset", "test", "--out", str(out),
                 "--patients", "3", "--visits", "4", "--scale", "1", "--cache-dir", str(tmp_path / "cache")]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 34 - 2, 4 * 34 - 2)


def test_preview_grid_rows_are_one_patient_in_visit_order(tmp_path):
    config = load_preset("test", {"cache-dir": str(tmp_path / "cache")})
    cohort = load_cohort(config)
    grid = preview_grid(cohort, patients=2, visits=3)
    table = cohort.table
    top = table.groupby("patient").size().sort_values(ascending=False, kind="stable").index[0]
    first = table[table["patient"] == top].sort_values("visit").iloc[0]["pixel_index"]
    np.testing.assert_array_equal(grid[:32, :32], cohort.pixels[first])
    assert (grid[32:34] == 255).all()
