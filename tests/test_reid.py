"""Tests of the patient retrieval and verification networks: contracts, training, and the audit's error rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_unlearn.data.phantom import PhantomConfig, load_phantom
from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.models.reid import ReIDConfig, RetrievalNet, VerificationNet, build_backbone, to_input
from fl_unlearn.privacy.audit import AuditConfig, audit, false_positive_control
from fl_unlearn.training.reid import (
    Precomputed,
    blur_noise,
    calibrate_threshold,
    embed,
    retrieval_metrics,
    train_retrieval,
    train_verification,
    verification_auc,
    verify,
)

SMALL = ReIDConfig(backbone="small-cnn", input_size=32)
COHORT = PhantomConfig(num_patients=160, image_size=32, min_images_per_patient=2, max_images_per_patient=6, seed=5)
HELD_OUT = 50  # the last patients: never seen in training


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small convolutions on 2 cores shared with other jobs run many times faster on one thread
    # (OpenMP workers spin while they wait for each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    table, pixels = load_phantom(COHORT, tmp_path_factory.mktemp("phantom"))
    patient = table["patient"].to_numpy()
    train = table["patient"].str[1:].astype(int).to_numpy() < COHORT.num_patients - HELD_OUT
    return {"pixels": pixels, "patient": patient, "train": train}


@pytest.fixture(scope="module")
def trained(cohort) -> dict:
    """Both networks trained briefly on the training patients, with the default blur degradation."""
    pixels, patient, train = cohort["pixels"][cohort["train"]], cohort["patient"][cohort["train"]], cohort["train"]
    torch.manual_seed(0)
    retrieval, verification = RetrievalNet(SMALL), VerificationNet(SMALL)
    history = {
        "retrieval": train_retrieval(retrieval, pixels, patient, steps=250, batch_size=64, seed=0),
        "verification": train_verification(verification, pixels, patient, steps=300, batch_size=48, seed=0),
    }
    return {"retrieval": retrieval, "verification": verification, "history": history, "train": train}


def _tiny(tmp_path) -> tuple[np.ndarray, np.ndarray]:
    table, pixels = load_phantom(
        PhantomConfig(num_patients=12, image_size=32, min_images_per_patient=2, max_images_per_patient=4), tmp_path
    )
    return pixels, table["patient"].to_numpy()


# --- contracts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "resnet50"])
def test_backbones_take_one_channel_and_return_flat_features(name):
    net, features = build_backbone(name, input_size=32)

    out = net.eval()(torch.randn(2, 1, 32, 32))

    assert out.shape == (2, features)


def test_resnet_keeps_its_maxpool_for_large_inputs():
    small, _ = build_backbone("resnet18", input_size=64)
    large, _ = build_backbone("resnet18", input_size=128)

    assert isinstance(small.maxpool, torch.nn.Identity) and isinstance(large.maxpool, torch.nn.MaxPool2d)


def test_config_rejects_unknown_backbone():
    with pytest.raises(ConfigError, match="backbone"):
        ReIDConfig(backbone="vgg")


def test_to_input_standardises_each_image_and_ignores_exposure():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)
    as_float = torch.from_numpy(images).float() / 255.0

    x = to_input(images, 32)

    assert x.shape == (3, 1, 32, 32)
    torch.testing.assert_close(x.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(to_input(0.5 * as_float + 0.2, 32), x, atol=5e-3, rtol=0)
    assert torch.isfinite(to_input(np.full((1, 32, 32), 7, dtype=np.uint8), 32)).all()


def test_shapes_and_unit_embeddings():
    torch.manual_seed(0)
    retrieval, verification = RetrievalNet(SMALL).eval(), VerificationNet(SMALL).eval()
    images = np.random.default_rng(1).integers(0, 256, (5, 48, 48), dtype=np.uint8)

    embeddings = embed(retrieval, images)
    scores = verify(verification, images, images[::-1].copy())

    assert embeddings.shape == (5, 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert scores.shape == (5,) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    x = to_input(images, 32)
    assert verification(x, x).shape == (5,)
    assert embed(retrieval, images[:0]).shape == (0, 128) and verify(verification, images[:0], images[:0]).shape == (0,)


def test_verification_head_is_monotone_and_symmetric():
    torch.manual_seed(0)
    net = VerificationNet(SMALL).eval()
    with torch.no_grad():
        net.raw_weight.normal_(0.0, 3.0)  # any raw weights: the constraint is structural
        difference = torch.rand(500, 128)
        larger = difference.clone()
        component = torch.randint(128, (500,))
        larger[torch.arange(500), component] += torch.rand(500)
        everywhere = difference + torch.rand(500, 128)
        a, b = to_input(torch.rand(4, 32, 32), 32), to_input(torch.rand(4, 32, 32), 32)

        assert (net.logit_from_difference(larger) <= net.logit_from_difference(difference)).all()
        assert (net.logit_from_difference(everywhere) <= net.logit_from_difference(difference)).all()
        torch.testing.assert_close(net(a, b), net(b, a))
        assert (net(a, a) >= net(a, b)).all()  # an exact copy scores the maximum


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["retrieval", "verification"])
def test_same_seed_gives_identical_weights(kind, tmp_path):
    pixels, patient = _tiny(tmp_path)
    net_class, train = {"retrieval": (RetrievalNet, train_retrieval), "verification": (VerificationNet, train_verification)}[kind]

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = net_class(SMALL)
        train(net, pixels, patient, steps=3, batch_size=16, seed=seed)
        return net.state_dict()

    first, second, other = run(1), run(1), run(2)

    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].is_floating_point())


@pytest.mark.parametrize("total", [1, 7, 40, 400])
def test_one_cycle_is_torchs_one_cycle(total):
    from fl_unlearn.training.common import one_cycle

    optimiser = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=total, pct_start=0.15)
    expected = []
    for _ in range(total):
        expected.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    np.testing.assert_allclose([1e-3 * one_cycle(i, total) for i in range(total)], expected, rtol=1e-9)


def test_rounds_continue_one_schedule_and_adams_moments(tmp_path):
    """Two calls of 3 steps placed at 0 and 3 of a 6-step cycle: the second continues the first's Adam state
    and learning rates, as FedAvg rounds of one hospital do."""
    pixels, patient = _tiny(tmp_path)
    torch.manual_seed(0)
    halves = VerificationNet(SMALL)
    first = train_verification(halves, pixels, patient, steps=3, batch_size=8, seed=1, total_steps=6)
    first_lr = [g["lr"] for g in first["optimizer_state"]["param_groups"]]
    torch.save(first["optimizer_state"], tmp_path / "kept.pt")  # a hospital keeps it on disk between rounds
    kept = torch.load(tmp_path / "kept.pt", weights_only=True)
    second = train_verification(halves, pixels, patient, steps=3, batch_size=8, seed=1, start_step=3, total_steps=6,
                                optimizer_state=kept)
    assert second["optimizer_state"]["state"][0]["step"] == 6  # Adam's bias correction continued
    from fl_unlearn.training.common import one_cycle

    assert first_lr == [pytest.approx(1e-3 * one_cycle(2, 6))]
    with pytest.raises(ConfigError, match="fit in the schedule"):
        train_verification(halves, pixels, patient, steps=3, batch_size=8, start_step=4, total_steps=6)


def test_training_reduces_both_losses(trained):
    for kind, history in trained["history"].items():
        losses = np.asarray(history["loss"])
        assert np.isfinite(losses).all(), kind
        assert losses[-30:].mean() < 0.7 * losses[:10].mean(), f"{kind}: {losses[:10].mean()} → {losses[-30:].mean()}"


def test_retrieval_needs_patients_with_two_images(tmp_path):
    pixels, patient = _tiny(tmp_path)
    lone = np.array([f"solo{i}" for i in range(len(patient))])

    with pytest.raises(DataError, match="2 patients with >= 2 images"):
        train_retrieval(RetrievalNet(SMALL), pixels, lone, steps=1)


def test_retrieval_trains_on_a_cohort_of_mostly_single_images(tmp_path):
    pixels, patient = _tiny(tmp_path)
    patient = patient.copy()
    patient[4:] = [f"solo{i}" for i in range(len(patient) - 4)]  # two or fewer patients keep a second image

    history = train_retrieval(RetrievalNet(SMALL), pixels, patient, steps=2, batch_size=16)

    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()


# --- re-identification of held-out patients and the audit's false positives ----------------------


def test_verification_separates_held_out_patients(cohort, trained):
    held = ~trained["train"]

    result = verification_auc(trained["verification"], cohort["pixels"][held], cohort["patient"][held], degrade=blur_noise)

    assert result["auc"] >= 0.9, result
    assert result["auc_degraded_copy"] >= 0.9, result  # (image, blurred image) vs different patients
    assert result["auc_degraded"] >= 0.9, result


def test_retrieval_finds_held_out_patients(cohort, trained):
    held = ~trained["train"]
    chance = (np.bincount(np.unique(cohort["patient"][held], return_inverse=True)[1]).mean() - 1) / held.sum()

    metrics = retrieval_metrics(trained["retrieval"], cohort["pixels"][held], cohort["patient"][held])

    assert metrics["precision_at_1"] >= max(0.6, 10 * chance), metrics
    assert 0.0 < metrics["map_at_r"] <= 1.0


def _audit(trained: dict, cohort: dict, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flagging pipeline against the training patients: rank-1 reference index and its score."""
    result = audit(trained["retrieval"], trained["verification"], queries, cohort["pixels"][trained["train"]])
    return result.rank1, result.scores


def _blurred(pixels: np.ndarray, seed: int) -> np.ndarray:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return blur_noise(pixels)


def test_blurred_unseen_patients_are_rarely_flagged(cohort, trained):
    unseen = _blurred(cohort["pixels"][~trained["train"]], seed=1)

    _, scores = _audit(trained, cohort, unseen)

    assert (scores >= 0.5).mean() <= 0.1, f"{(scores >= 0.5).mean():.1%} of blurred unseen images flagged"


def test_blurred_copies_of_training_images_are_flagged(cohort, trained):
    rows = np.flatnonzero(trained["train"])[::3]
    copies = _blurred(cohort["pixels"][rows], seed=2)

    nearest, scores = _audit(trained, cohort, copies)

    train_patients = cohort["patient"][trained["train"]]
    assert (train_patients[nearest] == cohort["patient"][rows]).mean() >= 0.9
    assert (scores >= 0.5).mean() >= 0.9


def test_planted_copies_are_found_and_fresh_patients_are_not(cohort, trained):
    """A synthetic set of exact and lightly perturbed copies of known patients' training images mixed
    with fresh images of unseen patients: the planted patients are found, the fresh images are not flagged."""
    train_rows = np.flatnonzero(trained["train"])
    train_patients = cohort["patient"][train_rows]
    planted_patients = np.unique(train_patients)[::2][:40]
    first_image = {p: train_rows[np.flatnonzero(train_patients == p)[0]] for p in planted_patients}
    rows = np.array([first_image[p] for p in planted_patients])
    exact = cohort["pixels"][rows[:20]]
    perturbed = _blurred(cohort["pixels"][rows[20:]], seed=3)  # blur σ ≤ 2 px, noise ≤ 3%
    fresh = cohort["pixels"][~trained["train"]]
    synthetic = np.concatenate([exact, perturbed, fresh])

    result = audit(trained["retrieval"], trained["verification"], synthetic, cohort["pixels"][train_rows], top_k=3)

    matched = train_patients[result.rank1]
    planted = np.arange(len(rows))
    found = result.flags[planted] & (matched[planted] == planted_patients)
    assert found.mean() >= 0.9, f"recall {found.mean():.2f}"
    fresh_flagged = result.flags[len(rows):].mean()
    assert fresh_flagged <= 0.1, f"{fresh_flagged:.1%} of fresh unseen-patient images flagged"
    assert result.neighbours.shape == (len(synthetic), 3)
    assert (np.diff(result.distances, axis=1) >= 0).all()


def test_false_positive_control_with_a_calibrated_threshold(cohort, trained):
    held = ~trained["train"]
    reference = cohort["pixels"][trained["train"]]
    reference_embeddings = embed(trained["retrieval"], reference)
    kwargs = {"degrade": lambda x: _blurred(x, seed=4), "seed": 0}
    args = (trained["retrieval"], trained["verification"], cohort["pixels"][held], cohort["patient"][held],
            reference, reference_embeddings)

    fixed = false_positive_control(*args, AuditConfig(), **kwargs)
    calibrated = false_positive_control(*args, AuditConfig(target_fpr=0.02), **kwargs)

    assert not fixed.calibrated and fixed.threshold == 0.5 and fixed.images == held.sum()
    assert fixed.rate <= 0.05
    assert calibrated.calibrated and 0 < calibrated.threshold <= 1
    # the rate is measured on the patients that did not set the threshold
    assert calibrated.images + calibrated.calibration_images == held.sum()
    assert 0 < calibrated.calibration_images < held.sum()
    assert calibrated.rate <= 0.1


# --- threshold calibration ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.37, 0.5])
@pytest.mark.parametrize("ties", [False, True])
def test_calibrated_threshold_is_the_smallest_meeting_the_target(target, ties):
    scores = np.random.default_rng(0).random(200).astype(np.float32)
    if ties:
        scores = np.round(scores, 1)

    threshold = calibrate_threshold(scores, target)

    assert (scores >= threshold).mean() <= target
    below = np.nextafter(np.float32(threshold), np.float32(-np.inf))  # the next lower score a float32 can hold
    assert (scores >= below).mean() > target


def test_blur_noise_keeps_shape_and_dtype_and_blurs():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)

    blurred = blur_noise(images)

    assert blurred.shape == images.shape and blurred.dtype == np.uint8
    assert np.abs(np.diff(blurred.astype(float), axis=2)).mean() < 0.5 * np.abs(np.diff(images.astype(float), axis=2)).mean()


def test_a_degradation_must_keep_the_image_format(tmp_path):
    pixels, patient = _tiny(tmp_path)

    with pytest.raises(DataError, match="degrade must map uint8 images"):
        verification_auc(VerificationNet(SMALL), pixels, patient, pairs=10, degrade=lambda x: x.astype(np.float32))


def test_calibrated_threshold_holds_for_float64_scores():
    scores = np.random.default_rng(1).random(101)

    threshold = calibrate_threshold(scores, 0.05)

    assert (scores >= threshold).sum() == 5 and (scores >= np.nextafter(threshold, -np.inf)).sum() == 6


def test_calibrate_threshold_rejects_bad_input():
    with pytest.raises(ConfigError):
        calibrate_threshold([0.1, 0.2], 1.0)
    with pytest.raises(DataError):
        calibrate_threshold([], 0.05)


def test_a_precomputed_degradation_returns_what_degrading_each_batch_returns():
    rng = np.random.default_rng(0)
    known = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    other = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    calls = []

    def degrade(images):
        calls.append(len(images))
        return (255 - images).astype(np.uint8)

    cached = Precomputed(degrade, known, batch_size=4)
    assert calls == [4, 2]  # the whole set once, in batches
    batch = known[[5, 0, 0, 3]]
    np.testing.assert_array_equal(cached(batch), degrade(batch))
    mixed = np.concatenate([known[[1]], other, known[[2]]])
    np.testing.assert_array_equal(cached(mixed), 255 - mixed)
    assert calls[-1] == 2  # only the two unknown images were degraded on demand
