"""Fréchet distance of image sets: pytorch-fid's implementation, on Inception or on domain features.

Standard FID needs the pt_inception weights file (``fid-inception-weights``), which nothing here can
download. Without it the same distance is computed on the penultimate features of the real-data
reference classifier and is *named differently* ("FID (domain features)") wherever it is reported:
the two are not comparable, and a silent fallback would mislead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid import fid_score, inception

from fl_unlearn.errors import ConfigError, DataError

STANDARD = "FID (Inception, pytorch-fid)"
DOMAIN = "FID (domain features)"


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features [N, D] (float64), as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise DataError(f"FID needs at least 2 feature vectors [N, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (pytorch-fid's function)."""
    mu1, sigma1 = statistics(a)
    mu2, sigma2 = statistics(b)
    return float(fid_score.calculate_frechet_distance(mu1, np.atleast_2d(sigma1), mu2, np.atleast_2d(sigma2)))


def inception_extractor(weights: str | Path, batch_size: int = 50,
                        device: torch.device | str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """pytorch-fid's InceptionV3 (pool3, 2048-d) loaded from a local pt_inception weights file."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"fid-inception-weights = {str(path)!r} does not exist; download pt_inception-2015-12-05 "
                          f"elsewhere and point to it, or leave it empty for {DOMAIN}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # pytorch-fid always fetches its weights by URL; hand it the local file instead.
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    model.to(device)

    @torch.no_grad()
    def extract(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i: i + batch_size])).float().div(255.0).unsqueeze(1)
            x = F.interpolate(x.to(device), size=(299, 299), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
            out.append(model(x)[0].squeeze(-1).squeeze(-1).cpu().numpy())
        return np.concatenate(out)

    return extract
