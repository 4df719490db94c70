"""Tests for the real-dataset loaders and image decoding, on tiny fixture folders in each release's layout."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fl_unlearn.data.cohort import COHORT_COLUMNS
from fl_unlearn.data.images import decode_image, decode_images
from fl_unlearn.data.loaders import LOADERS, load_chexpert, load_mimic, load_nih, missing_images
from fl_unlearn.errors import ConfigError, DataError

FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]  # fmt: skip


def _write_image(path: Path, width: int = 48, height: int = 32, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if mode == "I;16":
        pixels = rng.integers(0, 4096, size=(height, width)).astype(np.uint16)
    elif mode == "RGB":
        pixels = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    else:
        pixels = rng.integers(0, 256, size=(height, width)).astype(np.uint8)
    Image.fromarray(pixels).save(path)


# --- MIMIC-CXR-JPG --------------------------------------------------------------------------------

# (dicom_id, subject_id, study_id, ViewPosition, split)
MIMIC_IMAGES = [
    ("d-pos", "10000032", "50414267", "PA", "train"),
    ("d-pos-lat", "10000032", "50414267", "LATERAL", "train"),
    ("d-neg", "10000032", "53189527", "PA", "train"),
    ("d-ap", "10000032", "53189527", "AP", "train"),
    ("d-unc", "10000764", "57375967", "PA", "train"),
    ("d-empty", "11000011", "51111111", "PA", "validate"),
    ("d-nolabel", "11000011", "51111112", "PA", "train"),  # study absent from the label file
    ("d-test", "12000022", "52222222", "PA", "test"),
    ("d-noview", "12000022", "52222222", "", "test"),
]
# (subject_id, study_id, Cardiomegaly as written by the CheXpert labeler)
MIMIC_LABELS = [
    ("10000032", "50414267", "1.0"),
    ("10000032", "53189527", "0.0"),
    ("10000764", "57375967", "-1.0"),
    ("11000011", "51111111", ""),
    ("12000022", "52222222", "1.0"),
]


def _mimic_image(dicom: str, subject: str, study: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def _write_mimic(root: Path, labels=MIMIC_LABELS, gz: bool = False, drop_column: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    metadata = pd.DataFrame(
        {
            "dicom_id": [r[0] for r in MIMIC_IMAGES],
            "subject_id": [r[1] for r in MIMIC_IMAGES],
            "study_id": [r[2] for r in MIMIC_IMAGES],
            "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
            "ViewPosition": [r[3] for r in MIMIC_IMAGES],
            "Rows": 3056,
            "Columns": 2544,
            "StudyDate": "21800506",
            "StudyTime": "213014.531",
            "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
            "ViewCodeSequence_CodeMeaning": "postero-anterior",
            "PatientOrientationCodeSequence_CodeMeaning": "Erect",
        }
    )
    chexpert = pd.DataFrame(
        {"subject_id": [r[0] for r in labels], "study_id": [r[1] for r in labels]} | {f: "" for f in FINDINGS}
    )
    chexpert["Cardiomegaly"] = [r[2] for r in labels]
    split = pd.DataFrame(
        {
            "dicom_id": [r[0] for r in MIMIC_IMAGES],
            "study_id": [r[2] for r in MIMIC_IMAGES],
            "subject_id": [r[1] for r in MIMIC_IMAGES],
            "split": [r[4] for r in MIMIC_IMAGES],
        }
    )
    for name, frame in (("metadata", metadata), ("chexpert", chexpert), ("split", split)):
        if drop_column in frame.columns:
            frame = frame.drop(columns=drop_column)
        text = frame.to_csv(index=False)
        if gz:
            (root / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (root / f"mimic-cxr-2.0.0-{name}.csv").write_text(text)
    return root


def test_mimic_keeps_pa_views_with_certain_labels(tmp_path):
    root = _write_mimic(tmp_path / "mimic")
    _write_image(root / _mimic_image("d-pos", "10000032", "50414267"))

    result = load_mimic(root)

    table = result.table.set_index("image")
    assert list(result.table.columns) == list(COHORT_COLUMNS)
    assert list(table.index) == [
        _mimic_image("d-pos", "10000032", "50414267"),
        _mimic_image("d-neg", "10000032", "53189527"),
        _mimic_image("d-test", "12000022", "52222222"),
    ]
    assert table["patient"].tolist() == ["10000032", "10000032", "12000022"]
    assert table["study"].tolist() == ["50414267", "53189527", "52222222"]
    assert table["label"].tolist() == [1, 0, 1]
    assert table["split"].tolist() == ["train", "train", "test"]
    assert set(table["view"]) == {"PA"} and set(table["source"]) == {"mimic"}
    assert result.stats == {
        "images_total": 9,
        "images_pa": 6,
        "images_dropped_label": 3,
        "patients": 2,
        "images": 3,
    }
    assert result.root == root.absolute()
    assert missing_images(result) == [
        _mimic_image("d-neg", "10000032", "53189527"),
        _mimic_image("d-test", "12000022", "52222222"),
    ]


@pytest.mark.parametrize(
    ("policy", "missing_as_negative", "expected"),
    [
        ("u-zeros", False, {"d-pos": 1, "d-neg": 0, "d-unc": 0, "d-test": 1}),
        ("u-ones", False, {"d-pos": 1, "d-neg": 0, "d-unc": 1, "d-test": 1}),
        ("drop", True, {"d-pos": 1, "d-neg": 0, "d-empty": 0, "d-nolabel": 0, "d-test": 1}),
        ("u-ones", True, {"d-pos": 1, "d-neg": 0, "d-unc": 1, "d-empty": 0, "d-nolabel": 0, "d-test": 1}),
    ],
)
def test_mimic_label_policies(tmp_path, policy, missing_as_negative, expected):
    root = _write_mimic(tmp_path / "mimic")

    result = load_mimic(root, label_policy=policy, missing_as_negative=missing_as_negative)

    dicoms = result.table["image"].str.extract(r"/([^/]+)\.jpg$")[0]
    assert dict(zip(dicoms, result.table["label"], strict=True)) == expected
    assert result.stats["images_dropped_label"] == 6 - len(expected)
    if "d-empty" in expected:
        assert result.table.loc[dicoms == "d-empty", "split"].item() == "validate"


def test_mimic_reads_gzipped_csvs_in_a_subfolder(tmp_path):
    # The PhysioNet download unpacks into mimic-cxr-jpg/2.0.0/ with files/ beside the .csv.gz files.
    root = tmp_path / "physionet"
    _write_mimic(root / "2.0.0", gz=True)

    result = load_mimic(root)

    assert result.stats["images"] == 3
    assert result.table["image"].iloc[0] == "2.0.0/" + _mimic_image("d-pos", "10000032", "50414267")


@pytest.mark.parametrize("value", ["2.0", "yes"])
def test_mimic_unknown_label_value_names_row(tmp_path, value):
    labels = [*MIMIC_LABELS[:1], ("10000032", "53189527", value), *MIMIC_LABELS[2:]]
    root = _write_mimic(tmp_path / "mimic", labels=labels)

    with pytest.raises(DataError, match=rf"line 3 \(subject 10000032, study 53189527\): Cardiomegaly value '{value}'"):
        load_mimic(root)


def test_mimic_missing_column_is_named(tmp_path):
    root = _write_mimic(tmp_path / "mimic", drop_column="ViewPosition")

    with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-metadata\.csv has no column\(s\) \['ViewPosition'\]"):
        load_mimic(root)


def test_mimic_missing_csv_names_the_file(tmp_path):
    root = _write_mimic(tmp_path / "mimic")
    (root / "mimic-cxr-2.0.0-split.csv").unlink()

    with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-split\.csv or mimic-cxr-2\.0\.0-split\.csv\.gz"):
        load_mimic(root)


def test_mimic_all_labels_dropped_says_which_filter(tmp_path):
    labels = [(s, t, "-1.0") for s, t, _ in MIMIC_LABELS]
    root = _write_mimic(tmp_path / "mimic", labels=labels)

    with pytest.raises(DataError, match=r"all 6 PA images .* dropped for an uncertain \(-1\.0\) or missing"):
        load_mimic(root)


def test_mimic_unknown_label_policy_is_rejected(tmp_path):
    root = _write_mimic(tmp_path / "mimic")

    with pytest.raises(ConfigError, match="label_policy 'u-maybe' is unknown"):
        load_mimic(root, label_policy="u-maybe")


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------

# (Image Index, Finding Labels, Follow-up #, Patient ID, View Position)
NIH_ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, "PA"),
    ("00000001_002.png", "Cardiomegaly|Effusion", 2, 1, "AP"),
    ("00000002_000.png", "No Finding", 0, 2, "PA"),
    ("00000003_000.png", "Hernia|Mass", 0, 3, "PA"),
    ("00000003_001.png", "Effusion|Cardiomegaly|Mass", 1, 3, "PA"),
]


def _write_nih(root: Path, name: str = "Data_Entry_2017.csv", test_list: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
        + ("," if name == "Data_Entry_2017.csv" else "")  # the 2017 file has a trailing empty column
    ]
    for image, findings, follow_up, patient, view in NIH_ROWS:
        row = f"{image},{findings},{follow_up},{patient},58,M,{view},2682,2749,0.143,0.143"
        lines.append(row + ("," if name == "Data_Entry_2017.csv" else ""))
    (root / name).write_text("\n".join(lines) + "\n")
    if test_list:
        (root / "test_list.txt").write_text("00000003_000.png\n00000003_001.png\n")
    return root


def test_nih_kaggle_layout_with_16_bit_png(tmp_path):
    root = _write_nih(tmp_path / "nih")
    _write_image(root / "images_001" / "images" / "00000001_000.png", mode="I;16")
    _write_image(root / "images_002" / "images" / "00000003_001.png")

    result = load_nih(root)

    table = result.table
    assert table["image"].tolist() == [
        "images_001/images/00000001_000.png",
        "images/00000001_001.png",
        "images/00000002_000.png",
        "images/00000003_000.png",
        "images_002/images/00000003_001.png",
    ]
    assert table["patient"].tolist() == ["1", "1", "2", "3", "3"]
    assert table["study"].tolist() == ["1_0", "1_1", "2_0", "3_0", "3_1"]
    assert table["label"].tolist() == [1, 1, 0, 0, 1]
    assert table["split"].tolist() == ["train", "train", "train", "test", "test"]
    assert result.stats == {
        "images_total": 6,
        "images_pa": 5,
        "images_dropped_label": 0,
        "patients": 3,
        "images": 5,
    }
    assert missing_images(result) == ["images/00000001_001.png", "images/00000002_000.png", "images/00000003_000.png"]
    assert decode_image(result.root / table["image"].iloc[0], 16).shape == (16, 16)


def test_nih_metadata_only_folder_loads(tmp_path):
    root = _write_nih(tmp_path / "nih", name="Data_Entry_2017_v2020.csv", test_list=False)

    result = load_nih(root)

    assert set(result.table["split"]) == {"train"}
    assert missing_images(result) == result.table["image"].tolist()
    assert all(p.startswith("images/") for p in result.table["image"])


def test_nih_missing_column_is_named(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID,View Position\na.png,x,1,PA\n")

    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv has no column\(s\) \['Follow-up #'\]"):
        load_nih(root)


# --- CheXpert -------------------------------------------------------------------------------------

# (Path below the release folder, Frontal/Lateral, AP/PA, Cardiomegaly)
CHEXPERT_TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "1.0"),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "1.0"),
    ("train/patient00001/study2/view1_frontal.jpg", "Frontal", "AP", "0.0"),
    ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", "-1.0"),
    ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "PA", ""),
    ("train/patient00003/study2/view1_frontal.jpg", "Frontal", "PA", "0.0"),
]
CHEXPERT_VALID = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "PA", "1.0"),
    ("valid/patient64542/study1/view1_frontal.jpg", "Frontal", "AP", "0.0"),
]


def _write_chexpert_csv(path: Path, rows, release: str = "CheXpert-v1.0-small") -> None:
    frame = pd.DataFrame(
        {
            "Path": [f"{release}/{r[0]}" for r in rows],
            "Sex": "Female",
            "Age": 68,
            "Frontal/Lateral": [r[1] for r in rows],
            "AP/PA": [r[2] for r in rows],
        }
        | {f: "" for f in FINDINGS}
    )
    frame["Cardiomegaly"] = [r[3] for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


@pytest.mark.parametrize("root_is_release", [False, True])
def test_chexpert_frontal_pa_from_either_root(tmp_path, root_is_release):
    release = tmp_path / "CheXpert-v1.0-small"
    _write_chexpert_csv(release / "train.csv", CHEXPERT_TRAIN)
    _write_chexpert_csv(release / "valid.csv", CHEXPERT_VALID)
    _write_image(release / "train" / "patient00001" / "study1" / "view1_frontal.jpg", mode="RGB")
    root = release if root_is_release else tmp_path
    prefix = "" if root_is_release else "CheXpert-v1.0-small/"

    result = load_chexpert(root)

    table = result.table
    assert table["image"].tolist() == [
        prefix + "train/patient00001/study1/view1_frontal.jpg",
        prefix + "train/patient00003/study2/view1_frontal.jpg",
        prefix + "valid/patient64541/study1/view1_frontal.jpg",
    ]
    assert table["patient"].tolist() == ["patient00001", "patient00003", "patient64541"]
    assert table["study"].tolist() == ["patient00001_study1", "patient00003_study2", "patient64541_study1"]
    assert table["label"].tolist() == [1, 0, 1]
    assert table["split"].tolist() == ["train", "train", "validate"]
    assert result.stats == {
        "images_total": 8,
        "images_pa": 5,
        "images_dropped_label": 2,
        "patients": 3,
        "images": 3,
    }
    assert missing_images(result) == table["image"].tolist()[1:]
    assert decode_image(result.root / table["image"].iloc[0], 8).shape == (8, 8)


def test_chexpert_label_policy_and_train_only(tmp_path):
    _write_chexpert_csv(tmp_path / "train.csv", CHEXPERT_TRAIN)

    result = LOADERS["chexpert"](tmp_path, label_policy="u-ones", missing_as_negative=True)

    assert result.table["image"].tolist() == [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study1/view1_frontal.jpg",
        "train/patient00003/study1/view1_frontal.jpg",
        "train/patient00003/study2/view1_frontal.jpg",
    ]
    assert result.table["label"].tolist() == [1, 1, 0, 0]
    assert result.stats["images_dropped_label"] == 0


def test_chexpert_unknown_label_value_names_path(tmp_path):
    rows = [*CHEXPERT_TRAIN[:5], ("train/patient00003/study2/view1_frontal.jpg", "Frontal", "PA", "2.0")]
    _write_chexpert_csv(tmp_path / "train.csv", rows)

    with pytest.raises(
        DataError, match=r"train\.csv line 7 \(Path .*patient00003/study2.*\): Cardiomegaly value '2.0'"
    ):
        load_chexpert(tmp_path)


def test_chexpert_without_pa_rows_says_so(tmp_path):
    _write_chexpert_csv(tmp_path / "valid.csv", CHEXPERT_VALID[1:])

    with pytest.raises(DataError, match="none of the 1 rows .* is a frontal PA view"):
        load_chexpert(tmp_path)


# --- Bad roots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(LOADERS))
def test_nonexistent_root(tmp_path, source):
    with pytest.raises(DataError, match=r"root .*nowhere does not exist; expected a folder holding"):
        LOADERS[source](tmp_path / "nowhere")


@pytest.mark.parametrize("source", sorted(LOADERS))
def test_empty_root(tmp_path, source):
    with pytest.raises(DataError, match=r"root .* is empty; expected .*csv"):
        LOADERS[source](tmp_path)


def test_root_that_is_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")

    with pytest.raises(DataError, match="is not a folder"):
        load_nih(tmp_path / "data.zip")


def test_root_without_metadata_lists_expected_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")

    with pytest.raises(DataError, match=r"has no Data_Entry_2017_v2020\.csv .*expected Data_Entry_2017\.csv or"):
        load_nih(tmp_path)


# --- Image decoding -------------------------------------------------------------------------------


def test_decode_crops_the_center_of_a_wide_image(tmp_path):
    # 80x40 image, black except 10-pixel white bands at both ends, which the center crop removes.
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, :10] = pixels[:, -10:] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")

    out = decode_image(tmp_path / "wide.png", 20)

    assert out.shape == (20, 20) and out.dtype == np.uint8
    assert out.max() < 10


def test_decode_stretches_12_bit_values_in_a_16_bit_png(tmp_path):
    # Stored 12-bit data would look black if divided by 257; its own range must map to 0..255.
    pixels = np.zeros((32, 32), dtype=np.uint16)
    pixels[:, 16:] = 4095
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"

    out = decode_image(tmp_path / "deep.png", 32)

    assert out.dtype == np.uint8
    assert out[:, :8].max() == 0 and out[:, -8:].min() == 255


def test_decode_tall_rgb_jpeg_to_grayscale(tmp_path):
    _write_image(tmp_path / "tall.jpg", width=30, height=50, mode="RGB")

    out = decode_image(str(tmp_path / "tall.jpg"), 24)

    assert out.shape == (24, 24) and out.dtype == np.uint8


def test_decode_images_stacks_and_raises_on_first_missing(tmp_path):
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "b.jpg", width=20, height=20)

    stack = decode_images([tmp_path / "a.png", tmp_path / "b.jpg"], 12)

    assert stack.shape == (2, 12, 12) and stack.dtype == np.uint8
    with pytest.raises(DataError, match=r"image file .*gone\.png is missing"):
        decode_images([tmp_path / "a.png", tmp_path / "gone.png", tmp_path / "also-gone.png"], 12)


def test_decode_corrupt_image_names_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not a JPEG")

    with pytest.raises(DataError, match=r"image file .*junk\.jpg cannot be decoded \(UnidentifiedImageError"):
        decode_image(tmp_path / "junk.jpg", 16)


def test_decode_truncated_jpeg_names_file(tmp_path):
    _write_image(tmp_path / "full.jpg", width=64, height=64)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])

    with pytest.raises(DataError, match=r"cut\.jpg cannot be decoded .*truncated"):
        decode_image(tmp_path / "cut.jpg", 16)
