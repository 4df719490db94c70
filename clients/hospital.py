"""A hospital's identity and local state, resolved from the Flower node context."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from flwr.app import Context

from fl_unlearn.config import RunConfig
from fl_unlearn.data.partition import HospitalSplit, hospital_name
from fl_unlearn.data.sources import Cohort, hospital_split, load_federation
from fl_unlearn.errors import ConfigError
from fl_unlearn.io import atomic_path


@dataclass
class Hospital:
    """What one hospital holds: its index, its partition of the cohort and a private work directory."""

    index: int
    config: RunConfig
    cohort: Cohort
    rows: pd.DataFrame

    @property
    def name(self) -> str:
        return hospital_name(self.index)

    @property
    def work_dir(self) -> Path:
        # Node-local: nothing in here is ever sent. In simulation it sits under the run directory.
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
    def split(self) -> HospitalSplit:
        return hospital_split(self.config, self.rows, self.index)

    @classmethod
    def from_context(cls, context: Context) -> Hospital:
        config = RunConfig.from_run_config(context.run_config)
        index = hospital_index(context.node_config, config.num_hospitals)
        cohort, plan = load_federation(config)
        return cls(index=index, config=config, cohort=cohort, rows=plan.hospital_rows(cohort.table, index))


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
