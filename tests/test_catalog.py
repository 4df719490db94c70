"""The case-based catalog: only anonymous cases, an index and embeddings, and a viewer that works from disk."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from fl_unlearn.errors import DataError
from fl_unlearn.evaluation.catalog import build_catalog


def _catalog(tmp_path, flagged):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    index = pd.DataFrame({"label": [0, 1, 0, 1, 0, 1], "seed": range(100, 106)})
    embeddings = np.eye(6)[[0, 0, 1, 1, 2, 2]] + 0.01 * rng.normal(size=(6, 6))  # pairs of similar cases
    scores = np.linspace(0.1, 0.9, 6)
    return build_catalog(tmp_path / "catalog", images, index, scores, np.asarray(flagged), embeddings,
                         method="kl-away", embedding_name="test", neighbours=2)


def test_catalog_holds_only_cases_no_hospital_flags(tmp_path):
    summary = _catalog(tmp_path, [False, False, False, True, False, False])

    folder = tmp_path / "catalog"
    index = pd.read_csv(folder / "index.csv")
    assert summary["cases"] == 5 and summary["removed"] == 1
    assert index["id"].tolist() == [0, 1, 2, 4, 5]
    assert set(index.columns) == {"id", "file", "label", "seed", "method", "max_score"}
    assert all((folder / f).is_file() for f in index["file"])
    assert np.load(folder / "embeddings.npy").shape == (5, 6)
    assert not (tmp_path / "catalog.partial").exists()
    empty = _catalog(tmp_path, [True] * 6)  # nothing anonymous: an empty catalog that says so, not a crash
    assert empty["cases"] == 0 and pd.read_csv(folder / "index.csv").empty
    with pytest.raises(DataError, match="disagree"):
        build_catalog(tmp_path / "x", np.zeros((2, 4, 4), np.uint8), pd.DataFrame({"label": [0], "seed": [1]}),
                      np.zeros(2), np.zeros(2, bool), np.zeros((2, 3)), method="m", embedding_name="e")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_viewer_loads_in_headless_chromium_and_a_query_returns_neighbours(tmp_path):
    _catalog(tmp_path, [False] * 6)
    viewer = tmp_path / "catalog" / "viewer.html"

    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=3000", "--dump-dom", f"file://{viewer}?query=2"],
        capture_output=True, text=True, timeout=120, check=True).stdout

    grid = dom.split('id="grid"')[1]
    neighbours = dom.split('id="neighbours"')[1].split('id="grid"')[0]
    assert len(re.findall(r"<img", grid)) == 6  # every case shown
    assert "6 cases from method" in dom
    # the query (case 2) first, then its 2 nearest: case 3 (its pair) is the closest
    ids = re.findall(r'data-id="(\d+)"', neighbours)
    assert ids[0] == "2" and len(ids) == 3 and ids[1] == "3"
