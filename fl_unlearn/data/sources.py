"""One entry point for every data source: the cohort table plus a way to read its pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from fl_unlearn.config import RunConfig
from fl_unlearn.data.cohort import SOURCES
from fl_unlearn.data.partition import HospitalSplit, PartitionPlan, plan_partitions, split_hospital
from fl_unlearn.errors import DataError


@dataclass(frozen=True)
class Cohort:
    """A validated cohort table and where its pixels live.

    Real sources keep ``image`` as a path relative to ``root`` and decode on demand; the phantom
    keeps all pixels in memory (``pixels[table.pixel_index]``).
    """

    source: str
    table: pd.DataFrame
    image_size: int
    root: Path | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    stats: dict = field(default_factory=dict)

    def load_images(self, rows: pd.DataFrame) -> np.ndarray:
        """uint8 images [N, size, size] for rows of this cohort's table, in row order."""
        if self.pixels is not None:
            return self.pixels[rows["pixel_index"].to_numpy()]
        from fl_unlearn.data.images import decode_images

        assert self.root is not None
        return decode_images([self.root / p for p in rows["image"]], self.image_size)

    def missing_images(self) -> list[str]:
        """Relative paths of listed images that are not on disk (always empty for the phantom)."""
        if self.pixels is not None:
            return []
        assert self.root is not None
        return [p for p in self.table["image"] if not (self.root / p).is_file()]


def phantom_config(config: RunConfig):
    from fl_unlearn.data.phantom import PhantomConfig

    return PhantomConfig(
        num_patients=config.phantom_patients,
        image_size=config.image_size,
        prevalence=config.phantom_prevalence,
        max_images_per_patient=config.phantom_max_images,
        images_per_patient_exponent=config.phantom_images_exponent,
        seed=config.seed,
    )


def load_cohort(config: RunConfig) -> Cohort:
    """Load the configured source: the embedded phantom, or a local MIMIC-CXR-JPG / ChestX-ray14 / CheXpert folder."""
    if config.data_source not in SOURCES:
        raise DataError(f"unknown data source {config.data_source!r}; expected one of {list(SOURCES)}")
    if config.data_source == "phantom":
        from fl_unlearn.data.phantom import load_phantom

        table, pixels = load_phantom(phantom_config(config), config.cache_path)
        stats = {"images_total": len(table), "images_pa": len(table), "images_dropped_label": 0}
        return Cohort("phantom", table, config.image_size, pixels=pixels, stats=stats)

    from fl_unlearn.data.loaders import LOADERS

    loader = LOADERS[config.data_source]
    kwargs = {}
    if config.data_source in ("mimic", "chexpert"):
        kwargs = {"label_policy": config.label_policy, "missing_as_negative": config.missing_as_negative}
    result = loader(Path(config.data_root).expanduser(), **kwargs)
    return Cohort(config.data_source, result.table, config.image_size, root=result.root, stats=dict(result.stats))


def plan_for(config: RunConfig, cohort: Cohort) -> PartitionPlan:
    return plan_partitions(
        cohort.table,
        num_hospitals=config.num_hospitals,
        strategy=config.partition_strategy,
        seed=config.seed,
        test_fraction=config.test_fraction,
        test_split=config.test_split,
        dirichlet_alpha=config.dirichlet_alpha,
        hospital_patients=config.hospital_patients,
    )


@lru_cache(maxsize=2)
def load_federation(config: RunConfig) -> tuple[Cohort, PartitionPlan]:
    """Cohort and partition plan, memoized per process: simulated hospitals share a Ray worker."""
    cohort = load_cohort(config)
    return cohort, plan_for(config, cohort)


def hospital_split(config: RunConfig, rows: pd.DataFrame, index: int) -> HospitalSplit:
    """The local split a hospital makes of its own rows (training / LDM subset / holdout)."""
    return split_hospital(rows, seed=config.seed + index, holdout_fraction=config.hospital_holdout_fraction,
                          ldm_patients=config.ldm_patients)
