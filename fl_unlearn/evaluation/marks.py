"""How much of the phantom's small identifying marks (granulomas, devices) survives a transform such
as the autoencoder.

The phantom renders every image from parameters, so any image can be rendered again without its
granulomas or its device: the difference is exactly the mark, on exactly its pixels. A transform
``f`` keeps a mark when ``f(with) − f(without)`` still holds at least half of the mark's contrast
there. Comparing against ``f(without)`` rather than the real image credits the mark alone, not how
well ``f`` reproduces the ribs around it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pandas as pd

from fl_unlearn.data.phantom import PhantomConfig, patient_anatomy, render_image, visit_params
from fl_unlearn.errors import DataError

MARKS = ("granulomas", "device")


def _study(phantom: PhantomConfig, patient_index: int, visit: int, mark: str):
    """(anatomy, visit) of one study and the same pair without ``mark``, or None when it shows no such mark."""
    if mark not in MARKS:
        raise DataError(f"unknown mark {mark!r}; choose from {', '.join(MARKS)}")
    anatomy = patient_anatomy(patient_index, phantom.seed, phantom.prevalence)
    params = visit_params(anatomy, visit)
    if mark == "granulomas":
        return (anatomy, params, dataclasses.replace(anatomy, granulomas=()), params) if anatomy.granulomas else None
    return (anatomy, params, anatomy, dataclasses.replace(params, device_visible=False)) if params.device_visible else None


def shows_mark(phantom: PhantomConfig, patient_index: int, visit: int, mark: str) -> bool:
    """Whether the study carries ``mark`` (from its parameters, without rendering)."""
    return _study(phantom, patient_index, visit, mark) is not None


def render_pair(phantom: PhantomConfig, patient_index: int, visit: int, mark: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(image, the same image without ``mark``) of one study, or None when that study shows no such mark."""
    study = _study(phantom, patient_index, visit, mark)
    if study is None:
        return None
    anatomy, params, bare_anatomy, bare_params = study
    size, scale = phantom.image_size, phantom.render_scale
    return render_image(anatomy, params, size, scale), render_image(bare_anatomy, bare_params, size, scale)


def mark_retention(transform: Callable[[np.ndarray], np.ndarray], rows: pd.DataFrame, phantom: PhantomConfig,
                   mark: str, *, min_contrast: int = 16, kept_at: float = 0.5) -> dict:
    """Share of ``rows``' studies (phantom table rows: ``patient`` "P00012", ``visit``) whose ``mark``
    ``transform`` keeps, and the median share of the mark's contrast it keeps.

    Only pixels where the mark adds at least ``min_contrast`` grey levels count (a mark behind a
    collimator shutter or faint under the tone curve has none and the study is skipped).
    """
    withs, bares = [], []
    for patient, visit in zip(rows["patient"], rows["visit"], strict=True):
        pair = render_pair(phantom, int(str(patient).lstrip("P")), int(visit), mark)
        if pair is not None and (pair[0].astype(np.int16) - pair[1] >= min_contrast).any():
            withs.append(pair[0])
            bares.append(pair[1])
    if not withs:
        return {"studies": 0, "kept": None, "median_retention": None}
    with_mark, bare = np.stack(withs), np.stack(bares)
    out = np.asarray(transform(np.concatenate([with_mark, bare]))).astype(np.float64)
    out_with, out_bare = out[: len(withs)], out[len(withs):]
    contrast = with_mark.astype(np.float64) - bare
    masks = contrast >= min_contrast
    retention = np.array([(out_with[i] - out_bare[i])[m].sum() / contrast[i][m].sum() for i, m in enumerate(masks)])
    return {"studies": len(withs), "kept": round(float((retention >= kept_at).mean()), 4),
            "median_retention": round(float(np.median(retention)), 4)}
