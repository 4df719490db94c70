"""Tests of the phantom cohort: determinism, labels, identity, cache, and the re-identification proof."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fl_unlearn.data import phantom
from fl_unlearn.data.cohort import COHORT_COLUMNS
from fl_unlearn.data.phantom import (
    PhantomConfig,
    generate_phantom,
    image_count,
    load_phantom,
    patient_anatomy,
    render_image,
    visit_params,
)
from fl_unlearn.errors import ConfigError, DataError

SMALL = PhantomConfig(num_patients=40, seed=3)
TINY = PhantomConfig(num_patients=6, image_size=32, seed=1)


@pytest.fixture(scope="module")
def small_cohort() -> tuple[pd.DataFrame, np.ndarray]:
    return generate_phantom(SMALL)


# --- determinism and schema -------------------------------------------------------------------


def test_same_config_gives_identical_table_and_bytes(small_cohort):
    table, pixels = small_cohort

    table_again, pixels_again = generate_phantom(SMALL)

    pd.testing.assert_frame_equal(table, table_again)
    assert pixels.tobytes() == pixels_again.tobytes()


def test_another_seed_gives_another_cohort(small_cohort):
    _, pixels = small_cohort

    _, other = generate_phantom(dataclasses.replace(SMALL, seed=4))

    n = min(len(pixels), len(other))
    assert not np.array_equal(pixels[:n], other[:n])
    assert patient_anatomy(0, 3) != patient_anatomy(0, 4)


def test_table_follows_the_cohort_schema(small_cohort):
    table, pixels = small_cohort

    assert list(table.columns[: len(COHORT_COLUMNS)]) == list(COHORT_COLUMNS)
    assert {"pixel_index", "ctr", "sex", "age", "visit", "device"} <= set(table.columns)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(table), 64, 64)
    assert table["pixel_index"].tolist() == list(range(len(table)))
    assert table["image"].is_unique
    assert set(table["view"]) == {"PA"} and set(table["split"]) == {"train"} and set(table["source"]) == {"phantom"}
    first = table.iloc[0]
    assert (first["patient"], first["study"], first["image"]) == ("P00000", "P00000-S000", "P00000/S000.png")
    for _, visits in table.groupby("patient"):
        assert visits["visit"].tolist() == list(range(len(visits)))


def test_patient_is_the_same_person_whatever_the_cohort_size(small_cohort):
    table, pixels = small_cohort

    few_table, few_pixels = generate_phantom(dataclasses.replace(SMALL, num_patients=10))

    assert patient_anatomy(7, 3) == patient_anatomy(7, 3)
    mine, theirs = table[table["patient"] == "P00007"], few_table[few_table["patient"] == "P00007"]
    pd.testing.assert_frame_equal(
        mine.drop(columns="pixel_index").reset_index(drop=True),
        theirs.drop(columns="pixel_index").reset_index(drop=True),
    )
    np.testing.assert_array_equal(pixels[mine["pixel_index"]], few_pixels[theirs["pixel_index"]])


# --- labels -----------------------------------------------------------------------------------


def test_label_follows_the_ctr_rule(small_cohort):
    table, _ = small_cohort

    assert (table["label"] == (table["ctr"] > 0.5).astype(int)).all()
    assert table["label"].nunique() == 2


@pytest.mark.parametrize("prevalence", [0.1, 0.4, 0.7])
def test_prevalence_is_the_share_of_patients_with_baseline_ctr_above_half(prevalence):
    baseline = np.array([patient_anatomy(i, 9, prevalence).ctr for i in range(2000)])

    assert abs((baseline > 0.5).mean() - prevalence) < 0.04
    # Most patients sit clearly on one side of the threshold; a few are near it, so follow-ups can flip.
    assert 0.8 < (np.abs(baseline - 0.5) > 0.02).mean() < 0.97


def test_some_labels_change_across_visits():
    table, _ = generate_phantom(PhantomConfig(num_patients=150, max_images_per_patient=8, image_size=16, seed=2))

    assert (table.groupby("patient")["label"].nunique() > 1).any()
    assert table.groupby("patient")["ctr"].std().max() < 0.02


# A visit seen straight on, noise-free, through a linear window that clips nothing.
STRAIGHT_ON = {
    "dx": 0.0,
    "dy": 0.0,
    "rotation": 0.0,
    "magnification": 1.0,
    "noise": 0.0,
    "device_visible": False,
    "window_lo": 0.0,
    "window_hi": 3.0,
    "tone": 1.0,
    "collimation": (0.0, 0.0, 0.0, 0.0),
}


def test_heart_width_in_pixels_is_ctr_times_thorax_width():
    size = 256
    for index in range(6):
        anatomy = patient_anatomy(index, 5)
        visit = dataclasses.replace(visit_params(anatomy, 1), **STRAIGHT_ON)

        # The heart is what a zero-CTR render of the same visit lacks; find its borders at half height.
        with_heart = render_image(anatomy, visit, size).astype(int)
        without_heart = render_image(anatomy, dataclasses.replace(visit, ctr=0.0), size).astype(int)
        profile = (with_heart - without_heart).max(axis=0)
        midline = round((anatomy.spine_x + 1) / 2 * size)
        right, left = profile[:midline], profile[midline:]
        first = np.flatnonzero(right >= right.max() / 2).min()
        last = midline + np.flatnonzero(left >= left.max() / 2).max()
        measured = (last - first + 1) * (2 / size) / (anatomy.thorax_r + anatomy.thorax_l)

        assert measured == pytest.approx(visit.ctr, abs=0.015)


# --- identity ---------------------------------------------------------------------------------


def test_visits_share_identity_but_differ_in_pixels(small_cohort):
    table, pixels = small_cohort
    counts = table.groupby("patient").size()
    patient = counts.idxmax()
    rows = table[table["patient"] == patient]
    index = int(patient[1:])

    anatomy = patient_anatomy(index, SMALL.seed, SMALL.prevalence)
    visits = [visit_params(anatomy, v) for v in rows["visit"]]

    assert len(rows) >= 3
    assert anatomy == patient_anatomy(index, SMALL.seed, SMALL.prevalence)
    assert len({(v.dx, v.dy, v.rotation, v.inspiration) for v in visits}) == len(visits)
    stack = pixels[rows["pixel_index"]].astype(int)
    for a in range(len(stack)):
        for b in range(a + 1, len(stack)):
            assert np.abs(stack[a] - stack[b]).mean() > 3


def test_devices_appear_at_a_later_visit_and_then_stay():
    late = next(a for a in (patient_anatomy(i, 0) for i in range(2000)) if a.device != "none" and a.device_onset > 0)

    shown = [visit_params(late, v).device_visible for v in range(late.device_onset + 3)]
    before = visit_params(late, late.device_onset - 1)

    assert shown == [False] * late.device_onset + [True] * 3
    assert not np.array_equal(
        render_image(late, before, 64), render_image(late, dataclasses.replace(before, device_visible=True), 64)
    )


def test_images_per_patient_are_skewed():
    config = PhantomConfig()
    counts = np.array([image_count(config, i) for i in range(4000)])

    assert 0.55 < (counts == 1).mean() < 0.68
    assert 4 <= np.percentile(counts, 90) <= 7
    assert counts.max() <= config.max_images_per_patient and counts.max() > 10
    with_two = PhantomConfig(min_images_per_patient=2, max_images_per_patient=5)
    assert {image_count(with_two, i) for i in range(500)} <= {2, 3, 4, 5}


# --- config and cache -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 8),
        ("prevalence", 1.5),
        ("num_patients", 0),
        ("max_images_per_patient", 0),
        ("render_scale", 0),
        ("seed", -1),
        ("images_per_patient_exponent", float("nan")),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PhantomConfig(**{field: value})


def test_cache_key_changes_with_every_field():
    keys = {PhantomConfig().cache_key()}
    for field, value in [("num_patients", 301), ("image_size", 128), ("seed", 1), ("prevalence", 0.5)]:
        keys.add(PhantomConfig(**{field: value}).cache_key())

    assert len(keys) == 5
    assert PhantomConfig().cache_key() == PhantomConfig().cache_key()


def test_load_phantom_writes_once_then_reads(tmp_path, monkeypatch):
    table, pixels = load_phantom(TINY, tmp_path)
    folder = tmp_path / f"phantom-{TINY.cache_key()}"
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def must_not_run(config):
        raise AssertionError("load_phantom regenerated a cached cohort")

    monkeypatch.setattr(phantom, "generate_phantom", must_not_run)
    cached_table, cached_pixels = load_phantom(TINY, tmp_path)

    assert {"cohort.csv", "images.npy"} <= set(written)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
    pd.testing.assert_frame_equal(cached_table, table, check_exact=True)
    np.testing.assert_array_equal(cached_pixels, pixels)


def test_losing_a_cache_race_is_harmless(tmp_path, monkeypatch):
    generate = phantom.generate_phantom
    calls = []

    def racing(config):
        calls.append(config)
        if len(calls) == 1:  # another process publishes the cache while this one is still generating
            load_phantom(config, tmp_path)
        return generate(config)

    monkeypatch.setattr(phantom, "generate_phantom", racing)
    table, pixels = load_phantom(TINY, tmp_path)
    monkeypatch.setattr(phantom, "generate_phantom", generate)
    cached_table, cached_pixels = load_phantom(TINY, tmp_path)

    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == [f"phantom-{TINY.cache_key()}"]
    pd.testing.assert_frame_equal(cached_table, table, check_exact=True)
    np.testing.assert_array_equal(cached_pixels, pixels)


def test_inconsistent_cache_raises_data_error(tmp_path):
    load_phantom(TINY, tmp_path)
    folder = tmp_path / f"phantom-{TINY.cache_key()}"
    np.save(folder / "images.npy", np.zeros((2, 32, 32), dtype=np.uint8))

    with pytest.raises(DataError, match="delete"):
        load_phantom(TINY, tmp_path)


# --- the identity proof: re-identification of held-out patients --------------------------------

PROOF = PhantomConfig(num_patients=400, min_images_per_patient=2, max_images_per_patient=6, seed=11)
HELD_OUT = 100  # the last patients: never seen in training


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]


class VerificationNet(nn.Module):
    """Siamese CNN: a shared 64-d embedding at 32x32 (coarse anatomy), then a same-person logit."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.AvgPool2d(2), *_block(1, 16), *_block(16, 32), *_block(32, 64), nn.Flatten(), nn.Linear(64 * 16, 64)
        )
        self.head = nn.Linear(64, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.abs(self.embed(a) - self.embed(b))).squeeze(1)


@pytest.fixture(scope="module")
def proof_cohort() -> dict:
    table, pixels = generate_phantom(PROOF)
    x = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1)
    # Per-image standardisation: exposure differs per visit and must not be what identifies anyone.
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
    patient = table["patient"].str[1:].astype(int).to_numpy()
    return {
        "x": x,
        "patient": patient,
        "label": table["label"].to_numpy(),
        "train": patient < PROOF.num_patients - HELD_OUT,
    }


@pytest.fixture(scope="module")
def verification_scores(proof_cohort) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    x, patient, label = proof_cohort["x"], proof_cohort["patient"], proof_cohort["label"]
    images_of = {p: np.flatnonzero(patient == p) for p in np.unique(patient)}
    train_patients = np.unique(patient[proof_cohort["train"]])

    net = VerificationNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    batch = 32
    target = torch.cat([torch.ones(batch), torch.zeros(batch)])
    for _ in range(600):
        anchors = rng.choice(train_patients, batch)
        others = rng.choice(train_patients, batch)
        others = np.where(others == anchors, rng.choice(train_patients, batch), others)
        a = np.array([rng.choice(images_of[p]) for p in anchors])
        same = np.array([rng.choice(images_of[p][images_of[p] != i]) for p, i in zip(anchors, a)])
        other = np.array([rng.choice(images_of[p]) for p in others])
        keep = patient[other] != patient[a]  # the rare repeat draw of the same patient is dropped
        logits = net(torch.cat([x[a], x[a[keep]]]), torch.cat([x[same], x[other[keep]]]))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target[: batch + int(keep.sum())])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    net.eval()
    held = np.flatnonzero(~proof_cohort["train"])
    with torch.no_grad():
        embedding = net.embed(x[held])
    i, j = np.triu_indices(len(held), k=1)
    with torch.no_grad():
        scores = net.head(torch.abs(embedding[i] - embedding[j])).squeeze(1).numpy()
    same_patient = patient[held[i]] == patient[held[j]]
    same_label = label[held[i]] == label[held[j]]
    return {
        "all": (same_patient, scores),
        "label-matched": (same_patient[same_label], scores[same_label]),
    }


@pytest.mark.parametrize("pairs", ["all", "label-matched"])
def test_verification_network_reidentifies_held_out_patients(verification_scores, pairs):
    same_patient, scores = verification_scores[pairs]

    auc = roc_auc_score(same_patient, scores)

    assert same_patient.sum() > 150
    assert auc >= 0.9, f"{pairs} pairs: verification AUC {auc:.3f}"


def test_cardiomegaly_is_learnable_on_held_out_patients(proof_cohort):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(1)
    x, label, train = proof_cohort["x"], proof_cohort["label"], proof_cohort["train"]
    net = nn.Sequential(
        nn.AvgPool2d(2), *_block(1, 16), *_block(16, 32), *_block(32, 32), nn.Flatten(), nn.Linear(32 * 16, 1)
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    train_rows, y = np.flatnonzero(train), torch.from_numpy(label.astype(np.float32))
    for _ in range(300):
        rows = rng.choice(train_rows, 64)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[rows]).squeeze(1), y[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    net.eval()
    with torch.no_grad():
        scores = net(x[np.flatnonzero(~train)]).squeeze(1).numpy()
    auc = roc_auc_score(label[~train], scores)

    assert auc >= 0.9, f"cardiomegaly AUC {auc:.3f}"
