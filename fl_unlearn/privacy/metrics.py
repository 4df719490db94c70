"""Anonymization metrics of a synthetic set, one function each, as defined in the design's metrics.md.

N is the size of the audited synthetic set. An image is *non-anonymous* when the verification score
of its rank-1 retrieved real image is >= the threshold; a patient is *linked* when at least one
non-anonymous image points at them. Patients are opaque keys here (salted tokens in the federation),
so the same functions serve a hospital's own view and the server's pooled one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import numpy as np

from fl_unlearn.errors import DataError


def non_anon(flags: np.ndarray | Collection[bool]) -> int:
    """Non-Anon: how many synthetic images are flagged as re-identifying a real patient."""
    return int(np.count_nonzero(np.asarray(flags, dtype=bool)))


def _check_total(total: int) -> None:
    if total < 1:
        raise DataError(f"the synthetic set must hold at least one image, got N = {total}")


def oda(non_anonymous: int, total: int) -> float:
    """ODA (%): the share of the synthetic set that is anonymous, 100 · (N − Non-Anon) / N."""
    _check_total(total)
    if not 0 <= non_anonymous <= total:
        raise DataError(f"Non-Anon = {non_anonymous} is outside [0, N = {total}]")
    return 100.0 * (total - non_anonymous) / total


def pir(linked_patients: int, total: int) -> float:
    """PIR (%): distinct real patients linked to >= 1 non-anonymous image, per 100 synthetic images."""
    _check_total(total)
    if linked_patients < 0:
        raise DataError(f"the number of linked patients must be >= 0, got {linked_patients}")
    return 100.0 * linked_patients / total


def ua(forget_patients: Collection, linked_after: Collection) -> float:
    """UA (%), patient level: the share of the original forget set P_f no longer linked after unlearning.

    100 when P_f is empty (nothing had to be forgotten).
    """
    forget = set(forget_patients)
    if not forget:
        return 100.0
    return 100.0 * len(forget - set(linked_after)) / len(forget)


def ua_image(flags_before: np.ndarray, flags_after: np.ndarray) -> float:
    """UA (%), image level: of the seeds non-anonymous before, the share anonymous when regenerated after.

    Paired by seed: image i after unlearning is regenerated with image i's seed and label.
    """
    before, after = np.asarray(flags_before, dtype=bool), np.asarray(flags_after, dtype=bool)
    if before.shape != after.shape:
        raise DataError(f"image-level UA pairs images by seed; got {before.shape} flags before and "
                        f"{after.shape} after")
    if not before.any():
        return 100.0
    return 100.0 * float(np.count_nonzero(before & ~after)) / float(np.count_nonzero(before))


def newly_exposed(forget_patients: Collection, linked_after: Collection) -> set:
    """Patients linked after unlearning who were not in P_f (the paper's previously undetected identities)."""
    return set(linked_after) - set(forget_patients)


def linked_patients(matches: Iterable, flags: Iterable[bool]) -> set:
    """The distinct patients (keys) of the flagged images' rank-1 matches."""
    return {m for m, f in zip(matches, flags, strict=True) if f}


def summary(total: int, flags: np.ndarray, linked: Collection) -> dict:
    """Non-Anon, ODA, PIR and the linked-patient count of one audit (one hospital, or pooled)."""
    count = non_anon(flags)
    return {"images": int(total), "non_anon": count, "oda": oda(count, total), "patients_linked": len(linked),
            "pir": pir(len(linked), total)}


def unlearning_summary(forget_patients: Collection, linked_after: Collection, flags_before: np.ndarray,
                       flags_after: np.ndarray) -> dict:
    """UA (patient and image level) and the newly exposed patients, after unlearning, against P_f."""
    return {"ua": ua(forget_patients, linked_after), "ua_image": ua_image(flags_before, flags_after),
            "forget_patients": len(set(forget_patients)),
            "newly_exposed": len(newly_exposed(forget_patients, linked_after))}


def pooled_links(per_hospital: Mapping[str, Collection]) -> set:
    """Pool per-hospital linked tokens: a patient is counted once, at the hospital that holds them."""
    return {(hospital, token) for hospital, tokens in per_hospital.items() for token in tokens}


def pooled_control(per_hospital: Mapping[str, tuple[int, int]]) -> dict:
    """The federation's false-positive control from each hospital's (flagged, images): the pooled rate
    with its Wilson 95% interval, and the highest hospital's rate. Each hospital's control set is small
    (tens of images), so one hospital's rate alone says little: 2 of 33 is 6.1%, interval 1.7–19.6%."""
    from scipy.stats import binomtest

    flagged = sum(k for k, _ in per_hospital.values())
    images = sum(n for _, n in per_hospital.values())
    if images == 0:
        return {"flagged": 0, "images": 0, "rate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "rate_max": 0.0}
    ci = binomtest(flagged, images).proportion_ci(confidence_level=0.95, method="wilson")
    return {"flagged": flagged, "images": images, "rate": flagged / images, "ci_low": float(ci.low),
            "ci_high": float(ci.high), "rate_max": max(k / n if n else 0.0 for k, n in per_hospital.values())}
