"""The paper preset on a folder in MIMIC-CXR-JPG's layout: checked by prepare_mimic.py, refused clearly when
images are missing, and run end to end with tiny sizes (the paper's backbones, loss, splits and label policy)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from PIL import Image

from fl_unlearn.config import PRESET_DIR, load_preset
from fl_unlearn.data.phantom import PhantomConfig, load_phantom


def _script(name: str):
    return importlib.import_module(f"scripts.{name}")


def write_mimic_folder(root: Path, cache: Path, subjects: int = 36) -> dict:
    """A MIMIC-CXR-JPG v2 folder: the three metadata CSVs and a JPG per PA view, drawn from phantom patients.

    Each subject has up to 4 studies (one PA and one lateral view each); every 7th study has an uncertain
    cardiomegaly label (dropped by the paper's policy) and every 4th subject is in the official test split.
    """
    table, pixels = load_phantom(PhantomConfig(num_patients=subjects, image_size=64, seed=3), cache)
    meta, labels, split, kept = [], [], [], 0
    for i, (_, rows) in enumerate(table.groupby("patient", sort=True)):
        subject = f"1{i:07d}"
        for s, (_, row) in enumerate(rows.head(4).iterrows()):
            study = f"5{i:05d}{s:02d}"
            uncertain = (i * 4 + s) % 7 == 3
            kept += not uncertain
            labels.append({"subject_id": subject, "study_id": study,
                           "Cardiomegaly": "-1.0" if uncertain else f"{float(row['label']):.1f}"})
            for view in ("PA", "LATERAL"):
                dicom = f"{subject}{study}{view}"
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                              "split": "test" if i % 4 == 0 else "train"})
                if view == "PA":
                    path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels[int(row["pixel_index"])]).resize((96, 96)).save(path, quality=95)
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(labels).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    return {"kept": kept, "first_pa": next(root.glob("files/*/*/*/*PA.jpg"))}


#: The paper preset shrunk to test sizes; the kinds of everything (backbones, loss, splits, labels) stay.
TINY = {"image-size": 32, "vae-channels": "8,8,16,16", "vae-rounds": 1, "vae-local-steps": 2, "vae-batch-size": 8,
        "unet-channels": "16,32", "unet-layers-per-block": 1, "ldm-rounds": 1, "ldm-local-steps": 2,
        "ldm-batch-size": 8, "num-synthetic": 8, "sample-steps": 3, "reid-rounds": 1, "reid-local-steps": 1,
        "reid-batch-size": 4, "reid-eval-pairs": 8, "classifier-steps": 2, "classifier-rounds": 1, "classifier-local-steps": 2,
        "unlearn-rounds": 1, "unlearn-local-steps": 1, "unlearn-batch-size": 4, "wait-for-nodes-s": 10.0,
        "unlearn-methods": "kl-away,salun-kl-away"}  # one plain method and the one with a saliency mask


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    base = tmp_path_factory.mktemp("mimic")
    return {"root": base / "mimic-cxr-jpg" / "2.1.0", **write_mimic_folder(
        _mkdir(base / "mimic-cxr-jpg" / "2.1.0"), base / "cache")}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_prepare_mimic_checks_the_folder_and_writes_the_cohort_table(mimic, tmp_path, capsys):
    prepare = _script("prepare_mimic").main

    assert prepare([str(mimic["root"]), "--out", str(tmp_path / "cohort")]) == 0
    table = pd.read_csv(tmp_path / "cohort" / "cohort.csv", dtype=str)
    report = json.loads((tmp_path / "cohort" / "cohort-report.json").read_text())
    assert len(table) == report["images"] == mimic["kept"]  # PA views with a certain label
    assert set(table["split"]) == {"train", "test"} and report["missing_image_files"] == 0
    assert report["partition"]["disjoint"] and len(report["partition"]["hospitals"]) == 3
    assert "missing image files     0 of" in capsys.readouterr().out

    # A bad folder: one message, exit 2, nothing written.
    assert prepare([str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")]) == 2
    assert "MIMIC-CXR-JPG root" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_paper_preset_names_the_missing_images_and_starts_nothing(mimic, tmp_path, capsys):
    first = mimic["first_pa"]
    moved = tmp_path / first.name
    first.rename(moved)
    try:
        out = tmp_path / "runs"
        code = _script("run").main(["--preset", "paper", "--output-dir", str(out),
                                    "--run-config", f"data-root='{mimic['root']}'"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"1 of {mimic['kept']} images listed in data-root" in err and first.name in err
        assert not out.exists()
        assert _script("prepare_mimic").main([str(mimic["root"]), "--out", str(tmp_path / "c")]) == 1
        assert "not under" in capsys.readouterr().err and not (tmp_path / "c").exists()
    finally:
        moved.rename(first)


def test_the_paper_preset_runs_end_to_end_on_a_mimic_layout_folder(mimic, tmp_path):
    from clients.client_app import app as client_app
    from server.server_app import app as server_app
    from tests.fake_grid import FakeGrid

    config = load_preset(str(PRESET_DIR / "paper.toml"),
                         {**TINY, "data-root": str(mimic["root"]), "output-dir": str(tmp_path)})
    assert (config.reid_backbone, config.classifier_backbone, config.ldm_loss) == ("resnet50", "densenet121", "l1")
    run_config = config.to_run_config()
    grid = FakeGrid(client_app, run_config, num_nodes=config.num_hospitals)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    run_dir = tmp_path / "paper"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed", manifest
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert {row["method"] for row in results["rows"]} >= {"original", *config.methods}
    assert results["images"] == 8 and results["rows"][0]["fid_images"] == 8
    # The central test set is MIMIC's own test split: every 4th subject of the fixture.
    assert manifest["partition"]["test"]["patients"] == 9


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
