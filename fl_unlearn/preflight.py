"""Checks that run before a run writes anything: a bad input fails in seconds, with one message, and no output.

Everything that can be known from the run configuration and the cohort table is checked here rather
than hours later in the phase that would need it: files the configuration names, the partition
plan, each hospital's local split, and deletion requests against the patients each hospital holds.
"""

from __future__ import annotations

from pathlib import Path

from fl_unlearn.config import RunConfig
from fl_unlearn.data.partition import hospital_name
from fl_unlearn.data.sources import hospital_split, load_federation
from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.privacy.audit import check_requested, read_deletion_requests


def preflight(config: RunConfig) -> None:
    """Raise ``ConfigError``/``DataError`` naming what is wrong; never writes into the output folder."""
    if config.resume_from and not (config.run_dir / "manifest.json").is_file():
        raise ConfigError(f"resume-from = {config.resume_from!r} holds no manifest.json: not a run folder")
    # A resumed run's settings are compared with its manifest by RunDirectory, before it writes anything.
    if config.fid_inception_weights and not Path(config.fid_inception_weights).expanduser().is_file():
        raise ConfigError(f"fid-inception-weights = {config.fid_inception_weights!r} does not exist; point it to a "
                          f"local pt_inception weights file, or leave it empty for FID on domain features")
    cohort, plan = load_federation(config)  # unknown source, missing or malformed data, too many hospitals
    missing = cohort.missing_images()
    if missing:
        raise DataError(f"{len(missing)} of {len(cohort.table)} images listed in data-root = {config.data_root!r} "
                        f"are not on disk, e.g. {missing[0]}")
    for index in range(config.num_hospitals):
        rows = plan.hospital_rows(cohort.table, index)
        hospital_split(config, rows, index)  # a hospital that keeps no patient for training
        if config.deletion_requests:
            try:
                check_requested(read_deletion_requests(config.deletion_requests, hospital_name(index)),
                                rows["patient"].astype(str))
            except DataError as exc:
                raise DataError(f"{hospital_name(index)}: {exc}") from None
