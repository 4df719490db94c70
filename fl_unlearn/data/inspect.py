"""Look at a data source before training: counts, label prevalence, visits per patient, missing files, hospitals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fl_unlearn.config import RunConfig
from fl_unlearn.data.partition import describe_rows
from fl_unlearn.data.sources import Cohort, load_cohort, plan_for
from fl_unlearn.errors import DataError
from fl_unlearn.io import atomic_path


def cohort_report(config: RunConfig, cohort: Cohort | None = None) -> dict:
    """Everything ``inspect`` prints, as a dict (counts only; no patient ids)."""
    cohort = cohort or load_cohort(config)
    table = cohort.table
    per_patient = table.groupby("patient").size().to_numpy()
    missing = cohort.missing_images()
    report = {
        "source": cohort.source,
        "root": str(cohort.root) if cohort.root else None,
        "images_in_metadata": int(cohort.stats.get("images_total", len(table))),
        "pa_images": int(cohort.stats.get("images_pa", len(table))),
        "dropped_by_label_policy": int(cohort.stats.get("images_dropped_label", 0)),
        "label_policy": config.label_policy,
        **describe_rows(table),
        "patient_prevalence": round(float(table.groupby("patient")["label"].max().mean()), 4),
        "images_per_patient": {
            "mean": round(float(per_patient.mean()), 2),
            "median": float(np.median(per_patient)),
            "p90": float(np.percentile(per_patient, 90)),
            "max": int(per_patient.max()),
            "share_with_one": round(float((per_patient == 1).mean()), 4),
        },
        "missing_image_files": len(missing),
        "missing_examples": missing[:5],
    }
    try:
        plan = plan_for(config, cohort)
        report["partition"] = {"strategy": config.partition_strategy, "seed": config.seed, **plan.summary(table)}
    except DataError as exc:  # still worth printing the counts above
        report["partition_error"] = str(exc)
    return report


def format_report(report: dict) -> str:
    ipp = report["images_per_patient"]
    lines = [
        f"source                  {report['source']}" + (f"  ({report['root']})" if report["root"] else ""),
        f"images in metadata      {report['images_in_metadata']}",
        f"PA images               {report['pa_images']}",
        f"dropped by label policy {report['dropped_by_label_policy']}  (policy '{report['label_policy']}')",
        f"patients                {report['patients']}",
        f"images kept             {report['images']}",
        (f"cardiomegaly prevalence {100 * report['prevalence']:.1f}% of images, "
         f"{100 * report['patient_prevalence']:.1f}% of patients"),
        (f"images per patient      mean {ipp['mean']}, median {ipp['median']:g}, p90 {ipp['p90']:g}, "
         f"max {ipp['max']}, {100 * ipp['share_with_one']:.0f}% with one image"),
        f"missing image files     {report['missing_image_files']} of {report['images']}",
    ]
    lines += [f"  e.g. {p}" for p in report["missing_examples"]]
    if "partition" in report:
        part = report["partition"]
        lines.append(f"hospitals ({part['strategy']}, seed {part['seed']}):")
        lines.append(f"  {'site':<14}{'patients':>9}{'images':>8}{'positives':>10}{'prevalence':>11}")
        for h in part["hospitals"] + [{"hospital": "central test", **part["test"]}]:
            lines.append(f"  {h['hospital']:<14}{h['patients']:>9}{h['images']:>8}{h['positives']:>10}"
                         f"{h['prevalence']:>11.2f}")
    else:
        lines.append(f"hospitals               cannot partition: {report['partition_error']}")
    return "\n".join(lines)


def preview_grid(cohort: Cohort, *, patients: int = 6, visits: int = 6, pad: int = 2) -> np.ndarray:
    """uint8 grid: one row per patient (those with the most images on disk), one column per visit.

    Tiles are separated by ``pad`` white pixels; a patient with fewer visits leaves black tiles.
    """
    table = cohort.table
    if cohort.pixels is None:
        present = set(table["image"]) - set(cohort.missing_images())
        table = table[table["image"].isin(present)]
        if table.empty:
            raise DataError("no image files are present: nothing to preview (run `inspect` to see what is missing)")
    counts = table.groupby("patient").size()
    chosen = sorted(counts.index, key=lambda p: (-counts[p], p))[:patients]
    step = cohort.image_size + pad
    grid = np.full((len(chosen) * step - pad, visits * step - pad), 255, dtype=np.uint8)
    for r, patient in enumerate(chosen):
        rows = table[table["patient"] == patient]
        rows = rows.sort_values("visit" if "visit" in rows else "study", kind="stable").head(visits)
        for c in range(visits):
            grid[r * step: r * step + cohort.image_size, c * step: c * step + cohort.image_size] = 0
        for c, image in enumerate(cohort.load_images(rows)):
            grid[r * step: r * step + cohort.image_size, c * step: c * step + cohort.image_size] = image
    return grid


def tile_rows(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """uint8 grid of image rows (each ``[n_i, H, W]``) on white, ``pad`` white pixels between tiles."""
    size = max((r.shape[1] for r in rows if len(r)), default=0)
    if not size:
        raise DataError("no images to tile")
    step = size + pad
    columns = max(len(r) for r in rows)
    grid = np.full((len(rows) * step - pad, columns * step - pad), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid[r * step: r * step + size, c * step: c * step + size] = image
    return grid


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    path = Path(path)
    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path

