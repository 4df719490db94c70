"""A hospital's identity and local state, resolved from the Flower node context."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import pandas as pd
import torch
from flwr.app import Context

from fl_unlearn.config import RunConfig
from fl_unlearn.data.partition import HospitalSplit, hospital_name
from fl_unlearn.data.sources import Cohort, hospital_split, load_federation
from fl_unlearn.errors import ConfigError
from fl_unlearn.io import atomic_path

M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class Hospital:
    """What one hospital holds: its index, its partition of the cohort and a private work directory."""

    index: int
    config: RunConfig
    cohort: Cohort
    rows: pd.DataFrame
    #: The SuperNode's private folder (``work-dir`` in its node config); None: under the run directory.
    site_dir: Path | None = None

    @property
    def name(self) -> str:
        return hospital_name(self.index)

    @property
    def work_dir(self) -> Path:
        # Node-local: nothing in here is ever sent. In simulation it sits under the run directory; a
        # deployed SuperNode keeps it in its own folder (one per site), a subfolder per run.
        if self.site_dir is not None:
            path = self.site_dir / self.config.run_name
        else:
            path = self.config.run_dir / "hospitals" / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def optimizer_state(self, model: str, round_: int) -> dict | None:
        """The optimizer state this hospital kept after ``round_`` of training ``model`` (None if there is none)."""
        path = self.work_dir / f"{model}-optimizer-round{round_}.pt"
        return torch.load(path, weights_only=True) if round_ >= 1 and path.is_file() else None

    def keep_optimizer_state(self, model: str, round_: int, state: dict) -> None:
        """Keep ``state`` for the next round (never sent); a resumed round needs only the one before it."""
        with atomic_path(self.work_dir / f"{model}-optimizer-round{round_}.pt") as tmp:
            torch.save(state, tmp)
        (self.work_dir / f"{model}-optimizer-round{round_ - 2}.pt").unlink(missing_ok=True)

    @cached_property
    def device(self) -> torch.device:
        """Where this hospital trains: its GPU share when the federation gave it one, else the CPU."""
        return self.config.torch_device

    def load(self, model: M, state: dict[str, torch.Tensor] | None = None) -> M:
        """``model`` with ``state`` loaded (if given), on this hospital's device: every handler builds its models so."""
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.device)

    @cached_property
    def split(self) -> HospitalSplit:
        return hospital_split(self.config, self.rows, self.index)

    @classmethod
    def from_context(cls, context: Context) -> Hospital:
        config = site_config(RunConfig.from_run_config(context.run_config), context.node_config)
        index = hospital_index(context.node_config, config.num_hospitals)
        cohort, plan = load_federation(config)
        site_dir = context.node_config.get("work-dir")
        return cls(index=index, config=config, cohort=cohort, rows=plan.hospital_rows(cohort.table, index),
                   site_dir=Path(str(site_dir)).expanduser().resolve() if site_dir else None)


#: What a deployed SuperNode may set for itself in ``--node-config`` (besides ``hospital-id``).
SITE_KEYS = ("data-root", "cache-dir", "work-dir")


def site_config(config: RunConfig, node_config: dict) -> RunConfig:
    """The run configuration as this site sees it: its own data folder and cache replace the run's.

    The run config travels from the server; where the data lives is the site's business, so a
    SuperNode's ``data-root``/``cache-dir`` win. Any other node-config key is refused by name.
    """
    unknown = sorted(set(node_config) - {"hospital-id", "partition-id", "num-partitions", *SITE_KEYS})
    if unknown:
        raise ConfigError(f"unknown node-config key(s) {unknown}; a SuperNode may set 'hospital-id' and {list(SITE_KEYS)}")
    changes = {key.replace("-", "_"): str(node_config[key]) for key in ("data-root", "cache-dir") if key in node_config}
    return config.replace(**changes) if changes else config


def hospital_index(node_config: dict, num_hospitals: int) -> int:
    """Simulation gives ``partition-id``/``num-partitions``; a deployed SuperNode sets ``hospital-id``."""
    if "hospital-id" in node_config:
        index = int(node_config["hospital-id"])
    elif "partition-id" in node_config:
        index = int(node_config["partition-id"])
        parts = int(node_config.get("num-partitions", num_hospitals))
        if parts != num_hospitals:
            raise ConfigError(
                f"the federation has {parts} SuperNodes but num-hospitals = {num_hospitals}; "
                f"run with --federation-config \"num-supernodes={num_hospitals}\""
            )
    else:
        raise ConfigError("node config has neither 'hospital-id' nor 'partition-id': cannot tell which hospital this is")
    if not 0 <= index < num_hospitals:
        raise ConfigError(f"hospital index {index} is outside [0, {num_hospitals - 1}] (num-hospitals = {num_hospitals})")
    return index
