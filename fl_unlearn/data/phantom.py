"""Procedural PA chest radiographs with patient identity: the project's default, embedded cohort."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fl_unlearn.data.cohort import validate_cohort
from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.io import atomic_path, write_json_atomic, write_text_atomic

#: Bump whenever a change alters the pixels or the table, so stale caches are never reused.
GENERATOR_VERSION = "phantom-1"
DEVICES: tuple[str, ...] = ("none", "pacemaker", "sternotomy", "port")

_TEXTURE_COARSE = 8  # grid cells of the lung-density field (patches ~1/8 of the field)
_TEXTURE_FINE = 16  # grid cells of the vascular-marking field
_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


@dataclass(frozen=True)
class PhantomConfig:
    """What cohort to generate; the same config always gives the same bytes."""

    num_patients: int = 300
    image_size: int = 64
    prevalence: float = 0.4
    max_images_per_patient: int = 100
    images_per_patient_exponent: float = 2.0
    min_images_per_patient: int = 1
    render_scale: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_patients", self.num_patients, 1)
        _check_int("image_size", self.image_size, 16)
        _check_int("min_images_per_patient", self.min_images_per_patient, 1)
        _check_int("max_images_per_patient", self.max_images_per_patient, self.min_images_per_patient)
        _check_int("render_scale", self.render_scale, 1)
        _check_int("seed", self.seed, 0)
        _check_float("prevalence", self.prevalence, 0.0, 1.0)
        _check_float("images_per_patient_exponent", self.images_per_patient_exponent, 0.0, 10.0)

    def cache_key(self) -> str:
        """Short hash of every field and the generator version: the name of the cache folder."""
        payload = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PatientAnatomy:
    """One patient's identity: everything fixed across visits.

    Lengths are in the anatomy frame: x to the image's right (the patient's left, as in a PA film),
    y downwards, the field of view spanning [-1, 1] at magnification 1.
    """

    index: int
    seed: int
    sex: str
    age: int
    ctr: float  # baseline cardiothoracic ratio; above 0.5 is cardiomegaly
    # body habitus
    thorax_r: float  # inner rib-cage half-width on the patient's right (image left)
    thorax_l: float
    soft_tissue: float  # rib cage to skin
    shoulder_y: float
    shoulder_slope: float
    neck_w: float
    # lungs and mediastinum
    apex_y: float
    apex_x: float  # apex position as a fraction of the half-width
    apex_curve: float
    lung_taper: float  # narrowing of the upper lobes
    dome_r: float  # hemidiaphragm domes at mid inspiration
    dome_l: float
    dome_x: float
    cp_depth: float  # drop from the dome to the costophrenic angle
    mediastinum_w: float
    aortic_knob: float
    trachea_w: float
    hilum_y: float
    # skeleton
    rib_count: int
    rib_first_y: float
    rib_spacing: float
    rib_growth: float  # lower ribs sit further apart
    rib_rise: float
    rib_drop: float
    rib_thickness: float  # fraction of the spacing
    clavicle_y: float
    clavicle_slope_r: float
    clavicle_slope_l: float
    clavicle_len: float
    clavicle_bend: float
    spine_x: float  # the midline the CTR is measured from
    spine_c: float  # C-shaped scoliosis
    spine_s: float  # S-shaped scoliosis
    spine_w: float
    vertebra_h: float
    vertebra_phase: float
    # heart
    heart_right_frac: float  # share of the heart width right of the midline
    heart_top: float
    apex_lift: float  # heart apex above the left dome
    atrium_lift: float  # widest point of the right border above the apex
    atrium_reach: float  # how far up the right border bulges before it meets the cava
    heart_bulge_l: float
    heart_bulge_r: float
    # idiosyncratic marks
    granulomas: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    device: str
    device_onset: int  # first visit that shows the device
    device_x: float
    device_y: float
    device_size: float
    breast: tuple[float, float, float, float]  # (x, y, radius, density); density 0 for men
    texture_coarse: tuple[tuple[float, ...], ...]
    texture_fine: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class VisitParams:
    """What one study changes: positioning, breathing, technique and the CTR drift."""

    visit: int
    seed: int
    ctr: float
    dx: float
    dy: float
    rotation: float  # degrees
    magnification: float
    inspiration: float  # diaphragm shift, positive is deeper
    window_lo: float
    window_hi: float
    tone: float  # gain curve x / (x + tone (1 - x)): below 1 lifts the mid-tones
    noise: float
    collimation: tuple[float, float, float, float]  # top, bottom, left, right widths
    collimation_level: float
    marker: str
    marker_corner: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    marker_offset: tuple[float, float]
    device_visible: bool


def patient_anatomy(patient_index: int, seed: int, prevalence: float = 0.4) -> PatientAnatomy:
    """Draw patient ``patient_index``'s identity from its own seed.

    Only the baseline CTR reads ``prevalence`` (through a fixed uniform draw), so the same index and
    seed give the same person whatever the cohort size or prevalence.
    """
    _check_int("patient_index", patient_index, 0)
    _check_int("seed", seed, 0)
    _check_float("prevalence", prevalence, 0.0, 1.0)
    pseed = _derive_seed("patient", seed, patient_index)
    rng = np.random.default_rng(pseed)

    def uni(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    def norm(mean: float, std: float, lo: float, hi: float) -> float:
        return float(np.clip(rng.normal(mean, std), lo, hi))

    male = bool(rng.random() < 0.5)
    age = int(20 + 70 * rng.beta(2.0, 1.6))
    u_label, u_near, u_ctr = (float(v) for v in rng.random(3))
    if u_label < prevalence:
        ctr = 0.502 + 0.016 * u_ctr if u_near < 0.1 else 0.52 + 0.12 * u_ctr
    else:
        ctr = 0.482 + 0.016 * u_ctr if u_near < 0.1 else 0.36 + 0.12 * u_ctr

    half = norm(0.71 if male else 0.66, 0.04, 0.56, 0.8)
    asym = norm(0.0, 0.02, -0.05, 0.05)
    apex_y = uni(-0.8, -0.6)
    dome = uni(0.28, 0.5)
    dome_gap = uni(0.0, 0.09)  # the right dome usually sits higher (liver)
    heart_top = uni(-0.24, -0.06)
    spine_x = uni(-0.05, 0.05)
    scoliotic = rng.random() < 0.2
    rib_spacing = uni(0.1, 0.135)
    clavicle_y = apex_y + uni(0.16, 0.3)
    fields = {
        "sex": "M" if male else "F",
        "age": age,
        "ctr": ctr,
        "thorax_r": half * (1 + asym),
        "thorax_l": half * (1 - asym),
        "soft_tissue": uni(0.05, 0.2),
        "shoulder_y": uni(-1.05, -0.85),
        "shoulder_slope": uni(0.1, 0.4),
        "neck_w": uni(0.15, 0.24),
        "apex_y": apex_y,
        "apex_x": uni(0.3, 0.5),
        "apex_curve": uni(1.4, 3.0),
        "lung_taper": uni(0.25, 0.5),
        "dome_r": dome - dome_gap / 2,
        "dome_l": dome + dome_gap / 2,
        "dome_x": uni(0.3, 0.6),
        "cp_depth": uni(0.08, 0.22),
        "mediastinum_w": uni(0.09, 0.15),
        "aortic_knob": uni(0.02, 0.05) + 0.05 * (age - 20) / 70 * float(rng.random()),
        "trachea_w": uni(0.03, 0.05),
        "hilum_y": heart_top + uni(-0.1, 0.02),
        "rib_count": int(rng.integers(9, 12)),
        "rib_first_y": apex_y + uni(-0.02, 0.06),
        "rib_spacing": rib_spacing,
        "rib_growth": uni(0.0, 0.04),
        "rib_rise": uni(0.3, 0.6),
        "rib_drop": uni(0.65, 1.0),
        "rib_thickness": uni(0.28, 0.4),
        "clavicle_y": clavicle_y,
        "clavicle_slope_r": uni(0.25, 0.55),
        "clavicle_slope_l": uni(0.25, 0.55),
        "clavicle_len": uni(0.45, 0.62),
        "clavicle_bend": uni(0.03, 0.09),
        "spine_x": spine_x,
        "spine_c": uni(0.03, 0.08) * float(rng.choice((-1.0, 1.0))) if scoliotic else uni(-0.012, 0.012),
        "spine_s": uni(-0.06, 0.06) if scoliotic else uni(-0.01, 0.01),
        "spine_w": uni(0.1, 0.15),
        "vertebra_h": uni(0.085, 0.115),
        "vertebra_phase": uni(0.0, 0.1),
        "heart_right_frac": uni(0.3, 0.4),
        "heart_top": heart_top,
        "apex_lift": uni(0.03, 0.1),
        "atrium_lift": uni(0.04, 0.2),
        "atrium_reach": uni(0.15, 0.32),
        "heart_bulge_l": uni(0.1, 1.0),
        "heart_bulge_r": uni(0.3, 1.0),
    }
    n_granulomas = int(rng.choice(4, p=(0.45, 0.3, 0.15, 0.1)))
    granulomas = []
    for _ in range(n_granulomas):
        side = -1.0 if rng.random() < 0.5 else 1.0
        gy = uni(apex_y + 0.15, dome - 0.12)
        lo = 0.3 if gy < heart_top else 0.6  # stay lateral of the heart shadow
        granulomas.append((spine_x + side * half * uni(lo, 0.85), gy, uni(0.018, 0.035)))
    p_device = 0.08 + (0.17 if age > 65 else 0.0)
    device = str(rng.choice(DEVICES[1:], p=(0.45, 0.3, 0.25))) if rng.random() < p_device else "none"
    # Most devices predate the first study; the rest appear at a later follow-up and then stay.
    device_onset = 0 if rng.random() < 0.6 else int(rng.integers(1, 5))
    if device == "pacemaker":
        device_x, device_y = spine_x + half * uni(0.4, 0.6), clavicle_y + uni(0.1, 0.2)
    elif device == "port":
        device_x, device_y = spine_x - half * uni(0.35, 0.55), clavicle_y + uni(0.1, 0.2)
    else:
        device_x, device_y = spine_x + uni(-0.015, 0.015), clavicle_y + uni(0.1, 0.16)
    device_size = uni(0.85, 1.15)
    breast = (
        (half * uni(0.45, 0.65), dome - uni(0.05, 0.25), uni(0.25, 0.4), uni(0.12, 0.3))
        if not male
        else (0.0, 0.0, 1.0, 0.0)
    )
    coarse = rng.standard_normal((_TEXTURE_COARSE, _TEXTURE_COARSE))
    fine = rng.standard_normal((_TEXTURE_FINE, _TEXTURE_FINE))
    return PatientAnatomy(
        index=patient_index,
        seed=pseed,
        granulomas=tuple(granulomas),
        device=device,
        device_onset=device_onset,
        device_x=device_x,
        device_y=device_y,
        device_size=device_size,
        breast=breast,
        texture_coarse=tuple(tuple(float(v) for v in row) for row in coarse),
        texture_fine=tuple(tuple(float(v) for v in row) for row in fine),
        **fields,
    )


def visit_params(anatomy: PatientAnatomy, visit: int) -> VisitParams:
    """Draw study ``visit`` (0-based) of a patient from the seed hash(patient seed, visit)."""
    _check_int("visit", visit, 0)
    vseed = _derive_seed("visit", anatomy.seed, visit)
    rng = np.random.default_rng(vseed)

    def uni(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    def norm(std: float, limit: float) -> float:
        return float(np.clip(rng.normal(0.0, std), -limit, limit))

    def shutter() -> float:
        return uni(0.02, 0.12) if rng.random() < 0.3 else 0.0

    return VisitParams(
        visit=visit,
        seed=vseed,
        ctr=round(anatomy.ctr + norm(0.008, 0.015), 6),  # 6 decimals survive any CSV parser
        dx=norm(0.03, 0.07),
        dy=norm(0.03, 0.07),
        rotation=norm(1.5, 4.0),
        magnification=uni(0.94, 1.06),
        inspiration=norm(0.03, 0.07),
        window_lo=uni(-0.1, 0.05),
        window_hi=uni(1.35, 1.6),
        tone=math.exp(uni(-0.75, 0.0)),
        noise=uni(0.005, 0.02),
        collimation=(shutter(), shutter(), shutter(), shutter()),
        collimation_level=uni(0.8, 0.97),
        marker="L" if rng.random() < 0.7 else "R",
        marker_corner=int(rng.integers(0, 4)),
        marker_offset=(uni(0.03, 0.12), uni(0.03, 0.12)),
        device_visible=anatomy.device != "none" and visit >= anatomy.device_onset,
    )


def render_image(anatomy: PatientAnatomy, visit: VisitParams, size: int, render_scale: int = 2) -> np.ndarray:
    """Render one radiograph as uint8 ``[size, size]``: attenuation in the anatomy frame, seen
    through the visit's positioning and technique, supersampled ``render_scale`` times.

    Only IEEE-exact array arithmetic (no vector sin/exp/pow) touches pixels, so the bytes do not
    depend on the CPU's SIMD flavour.
    """
    _check_int("size", size, 16)
    _check_int("render_scale", render_scale, 1)
    a, v = anatomy, visit
    n = size * render_scale
    grid = (np.arange(n, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 / n) - np.float32(1.0)
    # Invert image = magnification * R(rotation) * anatomy + shift to find each pixel's anatomy point.
    cos, sin = math.cos(math.radians(v.rotation)), math.sin(math.radians(v.rotation))
    gx, gy = grid[None, :] - v.dx, grid[:, None] - v.dy
    x = (cos * gx + sin * gy) / v.magnification
    y = (cos * gy - sin * gx) / v.magnification
    px = 2.0 / (n * v.magnification)  # one render pixel in anatomy units
    soft, bone = max(0.03, px), max(0.01, px)

    xm = x - a.spine_x
    dist = np.abs(xm)
    right = xm < 0  # the patient's right is the image's left
    half = _side(right, a.thorax_r, a.thorax_l)
    u = dist / half

    # Body: soft tissue whose path length follows an elliptic cross-section.
    body_w = half + (0.045 + a.soft_tissue)
    torso_w = body_w + 0.3 * _ramp(a.apex_y + 0.3 - y, 0.25)  # the arms beside the upper chest
    shoulder = a.shoulder_y + a.shoulder_slope * np.square(dist / body_w)
    torso = _ramp(torso_w - dist, soft) * _ramp(y - shoulder, soft)
    chord = np.sqrt(np.clip(1.0 - np.square(dist / (1.08 * body_w)), 0.0, 1.0))
    neck = np.sqrt(np.clip(1.0 - np.square(dist / (1.1 * a.neck_w)), 0.0, 1.0))
    atten = np.maximum(torso * np.maximum(chord, 0.3), 0.6 * neck)

    # Lungs: lateral wall, apical dome, mediastinum and diaphragm bound the air.
    dome = _side(right, a.dome_r, a.dome_l) + v.inspiration
    lateral_t = np.clip((u - a.dome_x) / (1.0 - a.dome_x), 0.0, None)
    medial_t = np.clip((a.dome_x - u) / a.dome_x, 0.0, None)
    diaphragm = dome + a.cp_depth * lateral_t * lateral_t + 0.1 * medial_t * medial_t
    height = np.clip((dome - y) / (dome - a.apex_y), 0.0, 1.0)
    lateral = half * (1.0 - a.lung_taper * height * height)
    top = a.apex_y + a.apex_curve * np.square(u - a.apex_x)
    knob_y = a.heart_top - 0.13
    knob = a.aortic_knob * np.clip(1.0 - np.square((y - knob_y) / 0.1), 0.0, 1.0)
    medial = np.where(right, np.float32(0.9 * a.mediastinum_w), a.mediastinum_w + knob)
    lung = _ramp(lateral - dist, soft) * _ramp(dist - medial, soft) * _ramp(y - top, soft) * _ramp(diaphragm - y, soft)

    # Heart: the CTR fixes its widest extents left and right of the midline exactly.
    width = v.ctr * (a.thorax_r + a.thorax_l)
    apex_y = a.dome_l + v.inspiration - a.apex_lift
    atrium_y = apex_y - a.atrium_lift
    left = (1.0 - a.heart_right_frac) * width * _heart_profile(y, apex_y, apex_y - a.heart_top, a.heart_bulge_l)
    right_border = a.heart_right_frac * width * _heart_profile(y, atrium_y, a.atrium_reach, a.heart_bulge_r)
    heart = _ramp(left - xm, soft) * _ramp(xm + right_border, soft)

    # Air thins towards the chest wall and the apex; vessels fan out from each hilum.
    depth = np.clip((lateral - dist) / (0.35 * half), 0.0, 1.0) * np.clip((y - top) * 4.0 + 0.4, 0.0, 1.0)
    coarse = _texture(a.texture_coarse, x, y)
    radius = np.sqrt(np.square(dist - 0.15) + np.square(y - a.hilum_y))
    sine = (y - a.hilum_y) / (radius + 0.05)
    # Slow along the radius, fast across it: the noise's zero lines run outwards like vessels.
    fan = _texture(a.texture_fine, 0.48 * sine + np.where(right, np.float32(-0.5), np.float32(0.5)), 0.3 * radius - 1.0)
    vessels = np.square(np.clip(1.0 - 3.0 * np.abs(fan), 0.0, 1.0)) * np.clip(1.1 - radius, 0.0, 1.0)
    hilum = np.clip(1.0 - np.square((dist - 0.2) / 0.12) - np.square((y - a.hilum_y) / 0.16), 0.0, 1.0)
    air = lung * (1.0 - 0.85 * heart)
    atten -= air * (0.42 + 0.25 * depth) * (1.0 + 0.1 * coarse)
    atten += air * (0.18 * vessels + 0.25 * hilum)
    atten += 0.08 * heart

    trachea = _ramp(a.trachea_w - dist, bone) * _ramp(a.hilum_y - 0.08 - y, soft)
    atten -= 0.25 * trachea

    atten += _spine(a, xm, y, bone)
    atten += _ribs(a, dist, u, half, y, diaphragm, bone)
    atten += _clavicles(a, dist, right, y, bone)
    head_y = a.shoulder_y + a.shoulder_slope + 0.13
    atten += 0.14 * _ramp(0.13 - np.sqrt(np.square(dist - body_w - 0.03) + np.square(y - head_y)), bone)

    bx, by, br, density = a.breast
    if density > 0:
        q = np.square((dist - bx) / br) + np.square((y - by) / (0.8 * br))
        atten += density * np.sqrt(np.clip(1.0 - q, 0.0, 1.0))
    for cx, cy, r in a.granulomas:
        atten += 0.9 * _ramp(r - np.sqrt(np.square(x - cx) + np.square(y - cy)), px)
    if v.device_visible:
        atten += _device(a, v, x, xm, y, px)

    # Technique: window, tone curve, collimator shutters, laterality marker.
    image = np.clip((atten - v.window_lo) / (v.window_hi - v.window_lo), 0.0, 1.0)
    image = image / (image + v.tone * (1.0 - image))
    top_w, bottom_w, left_w, right_w = v.collimation
    open_field = (
        _ramp(grid[:, None] + 1.0 - top_w, px)
        * _ramp(1.0 - bottom_w - grid[:, None], px)
        * _ramp(grid[None, :] + 1.0 - left_w, px)
        * _ramp(1.0 - right_w - grid[None, :], px)
    )
    image = image * open_field + v.collimation_level * (1.0 - open_field)
    _stamp_marker(image, v)

    image = _block_mean(image, render_scale)
    rng = np.random.default_rng([v.seed, 1])
    image += (v.noise * (0.6 + 0.4 * image)) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def image_count(config: PhantomConfig, patient_index: int) -> int:
    """Number of images of one patient: truncated Zipf P(k) ∝ k^-a on [min, max], drawn from the
    patient's own stream (so it does not depend on ``num_patients``)."""
    ks = range(config.min_images_per_patient, config.max_images_per_patient + 1)
    weights = [k**-config.images_per_patient_exponent for k in ks]
    total = sum(weights)
    draw = np.random.default_rng([_derive_seed("patient", config.seed, patient_index), 2]).random() * total
    for k, w in zip(ks, weights):
        draw -= w
        if draw < 0:
            return k
    return config.max_images_per_patient


def generate_phantom(config: PhantomConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Generate the cohort table (validated, row i <-> ``pixels[i]``) and uint8 pixels ``[N, size, size]``."""
    counts = [image_count(config, i) for i in range(config.num_patients)]
    size = config.image_size
    pixels = np.empty((sum(counts), size, size), dtype=np.uint8)
    rows = []
    for index, count in enumerate(counts):
        anatomy = patient_anatomy(index, config.seed, config.prevalence)
        patient = f"P{index:05d}"
        for visit in range(count):
            params = visit_params(anatomy, visit)
            pixels[len(rows)] = render_image(anatomy, params, size, config.render_scale)
            rows.append(
                {
                    "patient": patient,
                    "study": f"{patient}-S{visit:03d}",
                    "image": f"{patient}/S{visit:03d}.png",
                    "label": int(params.ctr > 0.5),
                    "view": "PA",
                    "split": "train",
                    "source": "phantom",
                    "pixel_index": len(rows),
                    "ctr": params.ctr,
                    "sex": anatomy.sex,
                    "age": anatomy.age,
                    "visit": visit,
                    "device": anatomy.device if params.device_visible else "none",
                }
            )
    return validate_cohort(pd.DataFrame(rows), name="phantom cohort"), pixels


def load_phantom(config: PhantomConfig, cache_dir: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Return the cohort for ``config``, generating it once into ``cache_dir/phantom-<cache_key>/``.

    The folder is written under a temporary name and renamed into place, so it either exists whole
    or not at all; when two processes race, the loser's rename fails and it discards its (identical)
    copy.
    """
    root = Path(cache_dir) / f"phantom-{config.cache_key()}"
    if root.is_dir():
        return _read_cache(root, config)
    table, pixels = generate_phantom(config)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; a shared cache should be readable
    except OSError as exc:
        raise DataError(
            f"cannot write the phantom cache under {root.parent}: {exc}; pass a writable cache_dir"
        ) from exc
    try:
        write_text_atomic(staging / "cohort.csv", table.to_csv(index=False))
        with atomic_path(staging / "images.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, pixels, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        write_json_atomic(staging / "config.json", {"version": GENERATOR_VERSION, **dataclasses.asdict(config)})
        try:
            os.rename(staging, root)
        except OSError:
            if not root.is_dir():  # not a lost race: something else is in the way
                raise
    except OSError as exc:
        raise DataError(f"cannot write the phantom cache {root}: {exc}; delete it or pass another cache_dir") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return table, pixels


# --- rendering pieces -------------------------------------------------------------------------


def _ramp(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-mask: 0 outside, 1 inside, linear over ``width`` around the border."""
    return np.clip(signed * (1.0 / width) + 0.5, 0.0, 1.0)


def _side(right: np.ndarray, on_right: float, on_left: float) -> np.ndarray:
    return np.where(right, np.float32(on_right), np.float32(on_left))


def _heart_profile(y: np.ndarray, widest_y: float, up: float, roundness: float) -> np.ndarray:
    """Border offset in [0, 1], exactly 1 at ``widest_y``: from a straight slope (0) to an arc (1)."""
    reach = np.where(y < widest_y, np.float32(max(up, 0.1)), np.float32(0.45))
    t = np.abs(y - widest_y) / reach
    straight = np.clip(1.0 - t, 0.0, 1.0)
    return straight + roundness * (np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0)) - straight)


def _texture(field: tuple[tuple[float, ...], ...], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth (C1) interpolation of a patient's random grid, fixed in the anatomy frame."""
    values = _grid_values(field)
    side = len(field)
    cells = side - 1
    fx = np.clip((x + 1.0) * (0.5 * cells), 0.0, cells - 1e-3)
    fy = np.clip((y + 1.0) * (0.5 * cells), 0.0, cells - 1e-3)
    ix, iy = np.floor(fx), np.floor(fy)
    tx, ty = fx - ix, fy - iy
    tx, ty = tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty)
    at = (iy * side + ix).astype(np.intp)
    v00, v01 = values.take(at), values.take(at + 1)
    v10, v11 = values.take(at + side), values.take(at + (side + 1))
    upper = v00 + tx * (v01 - v00)
    return upper + ty * ((v10 + tx * (v11 - v10)) - upper)


@functools.lru_cache(maxsize=64)
def _grid_values(field: tuple[tuple[float, ...], ...]) -> np.ndarray:
    return np.asarray(field, dtype=np.float32).ravel()


def _spine(a: PatientAnatomy, xm: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Vertebral column: bodies, darker discs and pedicle ovals, following any scoliosis."""
    offset = np.abs(xm - (a.spine_c * (1.0 - y * y) + a.spine_s * y * (1.0 - y * y)))
    half_w = (0.5 * a.spine_w) * (1.0 + 0.12 * y)
    column = _ramp(half_w - offset, edge)
    phase = (y - a.vertebra_phase) * (1.0 / a.vertebra_h)
    level = phase - np.floor(phase) - 0.5  # -0.5..0.5 within one vertebra, discs at the ends
    disc = _ramp((np.abs(level) - 0.4) * a.vertebra_h, edge)
    pedicle = np.clip(
        1.0 - np.square((offset - 0.62 * half_w) / (0.18 * half_w)) - np.square((level + 0.12) / 0.22), 0.0, 1.0
    )
    return column * (0.13 - 0.05 * disc + 0.08 * pedicle)


def _ribs(
    a: PatientAnatomy,
    dist: np.ndarray,
    u: np.ndarray,
    half: np.ndarray,
    y: np.ndarray,
    diaphragm: np.ndarray,
    edge: float,
) -> np.ndarray:
    """Posterior ribs as curved bands found by inverting the rib-level map (faded under the
    diaphragm, where the abdomen hides them), plus faint anterior ribs."""
    g, spacing = a.rib_growth + 1e-3, a.rib_spacing
    z = y - half * (a.rib_drop * u * u - a.rib_rise * u) - a.rib_first_y
    k = (np.sqrt(np.clip(1.0 + (4.0 * g / spacing) * z, 0.0, None)) - 1.0) * (1.0 / (2.0 * g))
    shifted = k + (0.5 - 0.5 * a.rib_thickness)
    index = np.floor(shifted)
    across = shifted - index - 0.5
    band = _ramp((0.5 * a.rib_thickness - np.abs(across)) * (spacing * (1.0 + 2.0 * g * k)), edge)
    band *= (index >= 0) & (index < a.rib_count)
    band *= _ramp(dist - 0.06, edge) * _ramp((1.08 - u) * half, edge)
    cortex = 0.75 + np.square(across * (2.0 / a.rib_thickness))
    posterior = 0.12 * band * cortex * np.clip((diaphragm + 0.1 - y) * 3.0, 0.3, 1.0)

    anterior_gap = 1.3 * spacing
    za = (y - a.rib_first_y - 0.2 - 0.3 * half * np.square(1.0 - u)) * (1.0 / anterior_gap)
    index_a = np.floor(za)
    across_a = za - index_a - 0.5
    band_a = _ramp((0.22 - np.abs(across_a)) * anterior_gap, edge) * ((index_a >= 0) & (index_a < 6))
    return posterior + 0.05 * band_a * _ramp(u - 0.35, 0.1) * _ramp(1.02 - u, 0.05)


def _clavicles(a: PatientAnatomy, dist: np.ndarray, right: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    slope = _side(right, a.clavicle_slope_r, a.clavicle_slope_l)
    t = (dist - 0.07) * (1.0 / a.clavicle_len)
    centre = a.clavicle_y - slope * (dist - 0.07) + a.clavicle_bend * (4.0 * t * (1.0 - t)) * (2.0 * t - 1.0)
    half_t = 0.034 * (1.25 - 0.45 * t)
    across = np.abs(y - centre)
    bone = _ramp(half_t - across, edge) * _ramp(t * a.clavicle_len, edge) * _ramp((1.0 - t) * a.clavicle_len, edge)
    return bone * (0.16 + 0.1 * np.square(across / half_t))


def _wire(across: np.ndarray, along: np.ndarray, start: float, stop: float, half_w: float, px: float) -> np.ndarray:
    """A thin band |across| < half_w for start < along < stop, anti-aliased at pixel scale."""
    return _ramp(half_w - np.abs(across), px) * _ramp(along - start, px) * _ramp(stop - along, px)


def _device(a: PatientAnatomy, v: VisitParams, x: np.ndarray, xm: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """Metal: a pacemaker with its lead, sternotomy wires, or a port with its catheter."""
    s, cx, cy = a.device_size, a.device_x, a.device_y
    wire_w = max(0.008, 0.5 * px)
    if a.device == "sternotomy":
        gap = 0.1 * s
        phase = (y - cy) * (1.0 / gap)
        index = np.floor(phase)
        q = np.square((x - cx) / (0.04 * s)) + np.square((phase - index - 0.5) * gap / (0.016 * s))
        ring = np.clip(4.0 * (1.0 - q), 0.0, 1.0) * np.clip(4.0 * (q - 0.3), 0.0, 1.0)
        return 2.5 * ring * ((index >= 0) & (index < 6))
    # Lead or catheter: medially from the box to the cava, then down into the heart.
    entry_x = a.spine_x + (0.07 if a.device == "pacemaker" else -0.07)
    bottom = (a.dome_l + v.inspiration - a.apex_lift - 0.06) if a.device == "pacemaker" else a.heart_top + 0.05
    bottom_x = a.spine_x + (
        0.5 * (1.0 - a.heart_right_frac) * v.ctr * (a.thorax_r + a.thorax_l) if a.device == "pacemaker" else -0.06
    )
    t = np.clip((y - cy) / (bottom - cy), 0.0, 1.0)
    down = _wire(x - (entry_x + (bottom_x - entry_x) * t * t), y, cy, bottom, wire_w, px)
    sag = cy + 0.04 * np.square((x - 0.5 * (entry_x + cx)) / (0.5 * (cx - entry_x) + 1e-6)) - 0.04
    across = _wire(y - sag, (x - entry_x) * math.copysign(1.0, cx - entry_x), 0.0, abs(cx - entry_x), wire_w, px)
    line = np.maximum(down, across)
    if a.device == "pacemaker":
        q = np.square(np.square((x - cx) / (0.085 * s))) + np.square(np.square((y - cy) / (0.062 * s)))
        return 3.0 * np.maximum(np.clip(3.0 * (1.0 - q), 0.0, 1.0), line)
    r = np.sqrt(np.square(x - cx) + np.square(y - cy))
    disc = _ramp(0.045 * s - r, px)
    rim = disc * _ramp(r - 0.03 * s, px)
    return np.maximum(1.2 * disc + 1.3 * rim, 2.0 * line)


def _stamp_marker(image: np.ndarray, v: VisitParams) -> None:
    """Burn the laterality letter into the image near one corner (image, not anatomy, frame)."""
    n = image.shape[0]
    cell = max(1, round(0.008 * n))
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[v.marker]])
    glyph = np.kron(glyph, np.ones((cell, cell), dtype=bool))
    gh, gw = glyph.shape
    top = round(v.marker_offset[1] * n / 2) if v.marker_corner < 2 else n - gh - round(v.marker_offset[1] * n / 2)
    left = round(v.marker_offset[0] * n / 2) if v.marker_corner % 2 == 0 else n - gw - round(v.marker_offset[0] * n / 2)
    patch = image[top : top + gh, left : left + gw]
    patch[glyph] = 1.0


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsampling by an integer factor (anti-aliasing), summed in a fixed order."""
    if factor == 1:
        return image
    out = np.zeros((image.shape[0] // factor, image.shape[1] // factor), dtype=np.float32)
    for i in range(factor):
        for j in range(factor):
            out += image[i::factor, j::factor]
    return out * np.float32(1.0 / (factor * factor))


# --- cohort plumbing --------------------------------------------------------------------------


def _derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from a stable hash, so streams never depend on Python's hash randomisation."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def _read_cache(root: Path, config: PhantomConfig) -> tuple[pd.DataFrame, np.ndarray]:
    hint = f"delete {root} to regenerate it"
    try:
        pixels = np.load(root / "images.npy", allow_pickle=False)
        table = pd.read_csv(
            root / "cohort.csv",
            dtype={c: str for c in ("patient", "study", "image", "view", "split", "source", "sex", "device")},
            keep_default_na=False,
        )
    except (OSError, ValueError) as exc:
        raise DataError(f"phantom cache {root} is unreadable ({exc}); {hint}") from exc
    size = config.image_size
    if pixels.dtype != np.uint8 or pixels.shape != (len(table), size, size):
        raise DataError(
            f"phantom cache {root} holds pixels {pixels.dtype} {pixels.shape} for {len(table)} rows, "
            f"expected uint8 ({len(table)}, {size}, {size}); {hint}"
        )
    if "pixel_index" not in table.columns or not (table["pixel_index"].to_numpy() == np.arange(len(table))).all():
        raise DataError(f"phantom cache {root / 'cohort.csv'}: column 'pixel_index' is not 0..N-1; {hint}")
    return validate_cohort(table, name=f"phantom cache {root / 'cohort.csv'}"), pixels


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"phantom: {name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"phantom: {name} must be a number in [{lo}, {hi}], got {value!r}")
