"""Training, inference and evaluation of the patient retrieval and verification networks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, samplers
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import common_functions as pml_common
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import roc_auc_score
from torch import nn

from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.models.reid import ReIDNetworks, RetrievalNet, VerificationNet, to_input
from fl_unlearn.training.common import cycle_lrs, model_device

#: Share of the verification negatives' loss on the hardest impostors. Phantom, 64 px, 200 training
#: patients: unseen patients' nearest-neighbour audits flagged at 0.5 fell from 1% (share 0.5) to 0.3%.
_HARDEST_SHARE = 0.8

#: A degradation: uint8 images ``[B,H,W]`` → uint8 images of the same shape, e.g. "encode and decode
#: with the global VAE" (``functools.partial(fl_unlearn.training.vae.reconstruct, vae)``).
Degrade = Callable[[np.ndarray], np.ndarray]


def blur_noise(images: np.ndarray) -> np.ndarray:
    """The default degradation: Gaussian blur (σ 0.5–2 px at 64 px) plus pixel noise (std 0–3%), per image.

    Stands in for what makes generated images unlike sharp radiographs when no autoencoder is given.
    Draws from torch's global generator (the trainers and evaluators seed it).
    """
    x = torch.from_numpy(np.asarray(images, dtype=np.uint8)).float().unsqueeze(1) / 255.0
    n, _, h, _ = x.shape
    scale = h / 64
    sigma = torch.empty(n).uniform_(0.5, 2.0) * scale
    radius = max(1, int(np.ceil(3 * 2.0 * scale)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # Each image is its own channel, so one grouped convolution applies a different σ to each.
    y = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n).transpose(0, 1)
    y = y + torch.empty(n, 1, 1, 1).uniform_(0.0, 0.03) * torch.randn_like(y)
    return (y.squeeze(1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


class Precomputed:
    """``degrade`` applied once to a fixed set of images and looked up by content afterwards.

    A hospital's images and its autoencoder do not change while its re-identification networks train,
    yet decoding the degraded quarter of every batch through the VAE took two thirds of a step (0.31 of
    0.49 s on one core); reconstructing all ~300 training images once takes about 3 s. Images outside
    the set are degraded on demand, so this is a drop-in ``Degrade``.
    """

    def __init__(self, degrade: Degrade, images: np.ndarray | torch.Tensor, batch_size: int = 256):
        pixels = _as_pixels(images)
        self._degrade = degrade
        self._rows = {image.tobytes(): i for i, image in enumerate(pixels)}
        self._degraded = np.concatenate(
            [np.asarray(degrade(pixels[i: i + batch_size])) for i in range(0, len(pixels), batch_size)]
        ) if len(pixels) else pixels.copy()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        rows = np.array([self._rows.get(image.tobytes(), -1) for image in images], dtype=np.int64)
        known = rows >= 0
        if known.all():
            return self._degraded[rows]
        out = np.array(images, copy=True)
        out[known] = self._degraded[rows[known]]
        out[~known] = self._degrade(images[~known])
        return out


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Visit-like variation of [0, 1] images: small rotation, shift and zoom, and a random tone curve.

    A tone curve (gamma) rather than brightness/contrast: ``to_input`` standardises each image, which
    undoes any linear intensity change.
    """
    n = len(x)
    angle = torch.empty(n, device=x.device).uniform_(-3.0, 3.0).deg2rad()
    zoom = torch.empty(n, device=x.device).uniform_(0.95, 1.05)
    shift = torch.empty(n, 2, device=x.device).uniform_(-0.06, 0.06)  # 3% of the field either way
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(torch.empty(n, 1, 1, 1, device=x.device).uniform_(-0.3, 0.3))
    return x.clamp(1e-4, 1.0) ** gamma


def _degradations(degrade: Degrade | None) -> tuple[Degrade, ...]:
    # Blur is always among them: blurry samples of an undertrained LDM are what fool a verifier that
    # knows only sharp images, whatever autoencoder the hospital passes in addition.
    return (blur_noise,) if degrade is None else (blur_noise, degrade)


def _degraded(images: np.ndarray, degradations: Sequence[Degrade]) -> np.ndarray:
    """Each image through one of ``degradations``, chosen at random per image."""
    out = images.copy()
    choice = torch.randint(len(degradations), (len(images),)).numpy()
    with torch.no_grad():
        for k, degrade in enumerate(degradations):
            chosen = np.flatnonzero(choice == k)
            if len(chosen):
                result = np.asarray(degrade(images[chosen]))
                if result.shape != (len(chosen), *images.shape[1:]) or result.dtype != np.uint8:
                    raise DataError(
                        f"degrade must map uint8 images {(len(chosen), *images.shape[1:])} to the same shape and "
                        f"dtype, returned {result.dtype} {result.shape}"
                    )
                out[chosen] = result
    return out


def _prepare(
    pixels: np.ndarray,
    rows: np.ndarray,
    size: int,
    device: torch.device,
    *,
    degraded: np.ndarray,
    degradations: Sequence[Degrade],
) -> torch.Tensor:
    """A training batch: rows of the uint8 cohort, the ``degraded`` ones degraded, all augmented, as network input."""
    batch = pixels[rows]
    if degraded.any():
        batch[degraded] = _degraded(batch[degraded], degradations)
    x = torch.from_numpy(batch).to(device).float().unsqueeze(1) / 255.0
    return to_input(_augment(x), size)


def _as_pixels(images: np.ndarray | torch.Tensor) -> np.ndarray:
    x = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"re-identification expects uint8 images [N,H,W], got {x.dtype} {x.shape}")
    return x


def _patient_codes(patients: Sequence | np.ndarray, n_images: int) -> np.ndarray:
    codes = np.unique(np.asarray(patients), return_inverse=True)[1].reshape(-1)
    if len(codes) != n_images:
        raise DataError(f"got {len(codes)} patient ids for {n_images} images; pass one id per image")
    if codes.max(initial=-1) < 1:
        raise DataError("re-identification needs images of at least 2 patients")
    return codes


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for a block and restore the caller's random state afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _fit(model: nn.Module, *, steps: int, lr: float, seed: int, batch_loss: Callable[[], torch.Tensor],
         start_step: int = 0, total_steps: int | None = None, optimizer_state: dict | None = None) -> dict:
    """The loop both trainers share: Adam under a one-cycle schedule, one ``batch_loss()`` per step.

    ``start_step``/``total_steps`` place these steps inside a longer schedule and ``optimizer_state``
    continues Adam's moments from an earlier call (a hospital's previous FedAvg round).
    """
    lrs = cycle_lrs(lr, steps, start_step, total_steps)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    if optimizer_state is not None:
        optimiser.load_state_dict(optimizer_state)
    history: list[float] = []
    start = time.perf_counter()
    was_training = model.training
    model.train()
    with _seeded(seed, model_device(model)):
        for i in range(steps):
            for group in optimiser.param_groups:
                group["lr"] = lrs[i]
            loss = batch_loss()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.append(float(loss.detach()))
    model.train(was_training)
    return {"loss": history, "steps": steps, "seconds": time.perf_counter() - start,
            "optimizer_state": optimiser.state_dict()}


@contextlib.contextmanager
def _pml_numpy_seed(seed: int) -> Iterator[None]:
    # PML's samplers draw from a module-level numpy random state; swap in a seeded one for the block.
    saved = pml_common.NUMPY_RANDOM
    pml_common.NUMPY_RANDOM = np.random.RandomState(seed)
    try:
        yield
    finally:
        pml_common.NUMPY_RANDOM = saved


def train_retrieval(
    model: RetrievalNet,
    images: np.ndarray | torch.Tensor,
    patients: Sequence | np.ndarray,
    *,
    steps: int,
    batch_size: int = 64,
    per_patient: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    degrade: Degrade | None = None,
    memory_size: int = 256,
    start_step: int = 0,
    total_steps: int | None = None,
    optimizer_state: dict | None = None,
) -> dict:
    """Train ``model`` in place with a contrastive loss (positive margin 0, negative margin 1) over the
    batch and a cross-batch memory of the last ``memory_size`` embeddings.

    Batches hold ``per_patient`` images of each of ``batch_size // per_patient`` patients (PML's
    ``MPerClassSampler``; a patient with fewer images repeats some, each copy augmented differently).
    Only patients with at least 2 images are sampled, as in Packhäuser et al.: a lone image has no
    positive. Half of each batch is degraded (blur, and ``degrade`` when given) so
    that blurry or decoded samples still land near their patient. Returns the loss history.
    """
    pixels = _as_pixels(images)
    codes = _patient_codes(patients, len(pixels))
    counts = np.bincount(codes)
    rows = np.flatnonzero(counts[codes] >= 2)
    eligible = int((counts >= 2).sum())
    if eligible < 2:
        raise DataError(f"retrieval training needs 2 patients with >= 2 images each; this cohort has {eligible}")
    if not 1 <= per_patient <= batch_size:
        raise ConfigError(f"per_patient must be in [1, batch_size={batch_size}], got {per_patient}")
    batch = per_patient * min(batch_size // per_patient, eligible)  # small cohorts get smaller batches
    with _pml_numpy_seed(seed):
        sampler = samplers.MPerClassSampler(codes[rows], per_patient, batch_size=batch, length_before_new_iter=steps * batch)
        order = rows[np.fromiter(iter(sampler), dtype=np.int64)].reshape(steps, batch)
    labels = torch.as_tensor(codes)
    loss_fn = losses.CrossBatchMemory(
        losses.ContrastiveLoss(pos_margin=0, neg_margin=1),
        embedding_size=model.config.embedding_dim,
        memory_size=max(memory_size, batch),
    ).to(model_device(model))
    degradations = _degradations(degrade)
    rng = np.random.default_rng(seed)
    batches = iter(order)

    def batch_loss() -> torch.Tensor:
        batch_rows = next(batches)
        x = _prepare(
            pixels, batch_rows, model.config.input_size, model_device(model),
            degraded=rng.random(batch) < 0.5, degradations=degradations,
        )
        return loss_fn(model.embed(x), labels[batch_rows].to(model_device(model)))

    return _fit(model, steps=steps, lr=lr, seed=seed, batch_loss=batch_loss, start_step=start_step,
                total_steps=total_steps, optimizer_state=optimizer_state)


def _same_patient_pairs(rng: np.random.Generator, codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of two different images of one patient (patients drawn uniformly among those with ≥ 2)."""
    groups = [g for g in np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1]) if len(g) >= 2]
    if not groups:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    picked = rng.integers(len(groups), size=n)
    pairs = np.array([rng.choice(groups[g], size=2, replace=False) for g in picked]).reshape(n, 2)
    return pairs[:, 0], pairs[:, 1]


def _different_patient_pairs(rng: np.random.Generator, codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of images of two different patients, images drawn uniformly."""
    a, b = rng.integers(len(codes), size=n), rng.integers(len(codes), size=n)
    clash = codes[a] == codes[b]
    while clash.any():  # terminates: _patient_codes guarantees a second patient
        b[clash] = rng.integers(len(codes), size=int(clash.sum()))
        clash = codes[a] == codes[b]
    return a, b


def train_verification(
    model: VerificationNet,
    images: np.ndarray | torch.Tensor,
    patients: Sequence | np.ndarray,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    degrade: Degrade | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
    optimizer_state: dict | None = None,
) -> dict:
    """Train ``model`` in place with balanced BCE on same- and different-patient pairs.

    Each step draws ``batch_size`` positive pairs (a_i, b_i): half are two visits of one patient,
    half "same-visit" pairs (an image and an independently augmented copy of it; all of them when no
    patient has two images). Every (a_i, b_j) with different patients is a negative. The loss is
    half the positives' mean BCE and half the negatives', the latter mostly on each row's and
    column's hardest negative. Every image is degraded with probability 1/2 (blur, and ``degrade``
    when given), positives and negatives alike, so that degradation carries no information about
    identity: a blurry or decoded chest is not "same patient" for being blurry, and a blurred or
    autoencoded copy of a training image still is. Returns the loss history.
    """
    pixels = _as_pixels(images)
    codes = _patient_codes(patients, len(pixels))
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (one positive, one negative pair), got {batch_size}")
    degradations = _degradations(degrade)
    rng = np.random.default_rng(seed)

    def batch_loss() -> torch.Tensor:
        cross_a, cross_b = _same_patient_pairs(rng, codes, batch_size // 2)
        same_visit = rng.integers(len(codes), size=batch_size - len(cross_a))  # all of them if no patient has 2 images
        a, b = np.concatenate([cross_a, same_visit]), np.concatenate([cross_b, same_visit])
        x = _prepare(
            pixels, np.concatenate([a, b]), model.config.input_size, model_device(model),
            degraded=rng.random(2 * batch_size) < 0.5, degradations=degradations,
        )
        features = model.features(x)
        # Every (a_i, b_j) is a pair: the diagonal and other same-patient cells are positives, the rest negatives.
        logits = model.logit_from_difference(torch.abs(features[:batch_size, None] - features[None, batch_size:]))
        same = torch.as_tensor(codes[a][:, None] == codes[b][None, :], device=logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, same.float(), reduction="none")
        negatives = logits.masked_fill(same, -torch.inf)
        hardest = torch.cat([negatives.max(dim=1).values, negatives.max(dim=0).values])
        hardest = hardest[torch.isfinite(hardest)]  # a row of one patient only has no negative
        if not len(hardest):
            return bce[same].mean()
        # The audit pairs a synthetic image with its nearest training image, so the impostors that matter are
        # the most similar ones: most of the negative weight goes to each row's and column's hardest negative.
        negative_loss = (1 - _HARDEST_SHARE) * bce[~same].mean() + _HARDEST_SHARE * F.softplus(hardest).mean()
        return 0.5 * bce[same].mean() + 0.5 * negative_loss

    return _fit(model, steps=steps, lr=lr, seed=seed, batch_loss=batch_loss, start_step=start_step,
                total_steps=total_steps, optimizer_state=optimizer_state)


def _batched(
    model: nn.Module, n: int, batch_size: int, fn: Callable[[slice], torch.Tensor], row_shape: tuple[int, ...]
) -> np.ndarray:
    """``fn`` over slices of ``n`` rows in eval mode, concatenated as float32 ``[n, *row_shape]``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = [fn(slice(i, i + batch_size)).float().cpu().numpy() for i in range(0, n, batch_size)]
    model.train(was_training)
    return np.concatenate(out) if out else np.empty((0, *row_shape), dtype=np.float32)


def embed(model: RetrievalNet, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings float32 ``[N, embedding_dim]``; compare them with Euclidean distance."""
    size, device = model.config.input_size, model_device(model)
    return _batched(
        model, len(images), batch_size,
        lambda s: model.embed(to_input(images[s], size).to(device)), (model.config.embedding_dim,),
    )


def verify(
    model: VerificationNet, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Same-patient probabilities float32 ``[N]`` in [0, 1] of the pairs ``(a[i], b[i])``."""
    if len(a) != len(b):
        raise DataError(f"verify needs as many first as second images, got {len(a)} and {len(b)}")
    size, device = model.config.input_size, model_device(model)
    return _batched(
        model, len(a), batch_size,
        lambda s: model.score(to_input(a[s], size).to(device), to_input(b[s], size).to(device)), (),
    )


def verification_auc(
    model: VerificationNet,
    images: np.ndarray | torch.Tensor,
    patients: Sequence | np.ndarray,
    *,
    pairs: int = 2000,
    seed: int = 0,
    degrade: Degrade | None = None,
) -> dict:
    """ROC AUC of same- against different-patient pairs on the given (held-out) patients.

    ``auc``: two visits of one patient vs two patients. With ``degrade`` also
    ``auc_degraded_copy``: (degrade(x), x) vs (degrade(x), y of another patient), the near-copy case;
    and ``auc_degraded``: (degrade(x), another visit of x's patient) vs the same negatives.
    """
    pixels = _as_pixels(images)
    codes = _patient_codes(patients, len(pixels))
    rng = np.random.default_rng(seed)
    same_a, same_b = _same_patient_pairs(rng, codes, pairs)
    if not len(same_a):
        raise DataError("verification AUC needs a patient with >= 2 images")
    neg_a, neg_b = _different_patient_pairs(rng, codes, pairs)
    truth = np.r_[np.ones(pairs), np.zeros(pairs)]
    result = {
        "pairs": 2 * pairs,
        "auc": float(roc_auc_score(truth, verify(model, pixels[np.r_[same_a, neg_a]], pixels[np.r_[same_b, neg_b]]))),
    }
    if degrade is not None:
        with _seeded(seed, model_device(model)):
            degraded = _degraded(pixels[np.r_[same_a, neg_a]], (degrade,))
        copy_scores = verify(model, degraded[:pairs], pixels[same_a])
        visit_scores = verify(model, degraded[:pairs], pixels[same_b])
        neg_scores = verify(model, degraded[pairs:], pixels[neg_b])
        result["auc_degraded_copy"] = float(roc_auc_score(truth, np.r_[copy_scores, neg_scores]))
        result["auc_degraded"] = float(roc_auc_score(truth, np.r_[visit_scores, neg_scores]))
    return result


def retrieval_metrics(model: RetrievalNet, images: np.ndarray | torch.Tensor, patients: Sequence | np.ndarray) -> dict:
    """Precision@1 and mAP@R (PML's ``AccuracyCalculator``), every image querying all the others.

    Images of patients with a single image are distractors only (PML skips queries without a match).
    """
    pixels = _as_pixels(images)
    codes = _patient_codes(patients, len(pixels))
    if np.bincount(codes).max() < 2:
        raise DataError("retrieval metrics need a patient with >= 2 images")
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(LpDistance()),  # the training distance; faiss is not a dependency
    )
    scores = calculator.get_accuracy(embed(model, pixels), codes)
    return {"precision_at_1": float(scores["precision_at_1"]), "map_at_r": float(scores["mean_average_precision_at_r"])}


def calibrate_threshold(negative_scores: np.ndarray | Sequence[float], target_fpr: float) -> float:
    """The smallest threshold ``t`` with ``mean(negative_scores >= t) <= target_fpr``.

    Flagging is ``score >= t``, so ``t`` is the next float above the highest negative score that must
    stay unflagged (next in the scores' own precision, so float32 scores compared with ``t`` are not
    rounded back onto it); any lower threshold would flag more negatives than the target allows.
    """
    scores = np.asarray(negative_scores).reshape(-1)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not len(scores) or not np.isfinite(scores).all():
        raise DataError("calibrate_threshold needs a non-empty set of finite different-patient scores")
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1), got {target_fpr}")
    n = len(scores)
    allowed = int(np.floor(target_fpr * n))  # how many negatives may be flagged, exactly: allowed / n <= target
    allowed += (allowed + 1) / n <= target_fpr
    allowed -= allowed / n > target_fpr
    highest_unflagged = np.sort(scores)[::-1][allowed]
    return float(np.nextafter(highest_unflagged, np.array(np.inf, dtype=scores.dtype)))


def train_reid(nets: ReIDNetworks, images: np.ndarray, patients: Sequence | np.ndarray, *, steps: int,
               batch_size: int = 64, lr: float = 1e-3, seed: int = 0, degrade: Degrade | None = None,
               start_step: int = 0, total_steps: int | None = None, optimizer_state: dict | None = None) -> dict:
    """Train both networks of a hospital in place, ``steps`` each; returns their final losses and time.

    ``optimizer_state`` (``{"retrieval": …, "verification": …}``, as returned) and ``start_step`` /
    ``total_steps`` continue a schedule across FedAvg rounds (see ``one_cycle``).
    """
    state = optimizer_state or {}
    schedule = {"start_step": start_step, "total_steps": total_steps}
    retrieval = train_retrieval(nets.retrieval, images, patients, steps=steps, batch_size=batch_size, lr=lr,
                                seed=seed, degrade=degrade, optimizer_state=state.get("retrieval"), **schedule)
    verification = train_verification(nets.verification, images, patients, steps=steps, batch_size=batch_size,
                                      lr=lr, seed=seed + 1, degrade=degrade,
                                      optimizer_state=state.get("verification"), **schedule)
    tail = max(1, steps // 5)  # the last fifth: one step's loss is noisy
    return {"retrieval_loss": float(np.mean(retrieval["loss"][-tail:])),
            "verification_loss": float(np.mean(verification["loss"][-tail:])),
            "seconds": retrieval["seconds"] + verification["seconds"],
            "optimizer_state": {"retrieval": retrieval["optimizer_state"],
                                "verification": verification["optimizer_state"]}}


def evaluate_reid(nets: ReIDNetworks, images: np.ndarray, patients: Sequence | np.ndarray, *, pairs: int = 1000,
                  seed: int = 0, degrade: Degrade | None = None) -> dict:
    """Verification AUC (also on degraded images) and retrieval P@1 / mAP@R on held-out patients."""
    result = {f"verification_{k}": v for k, v in verification_auc(
        nets.verification, images, patients, pairs=pairs, seed=seed, degrade=degrade).items() if k != "pairs"}
    result.update({f"retrieval_{k}": v for k, v in retrieval_metrics(nets.retrieval, images, patients).items()})
    return result
