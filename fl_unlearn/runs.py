"""The run directory: manifest with run config, partition summary, phase status and library versions."""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from fl_unlearn.config import RunConfig
from fl_unlearn.errors import ConfigError
from fl_unlearn.io import write_json_atomic

#: Libraries whose versions change numbers; recorded in every manifest and results file.
TRACKED_PACKAGES = ("fl-unlearn", "torch", "torchvision", "flwr", "flwr-datasets", "diffusers",
                    "numpy", "pandas", "scikit-learn", "pytorch-fid", "pytorch-metric-learning")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunDirectory:
    """``<output-dir>/<run-name>/`` and its ``manifest.json``; every write is atomic."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.path = config.run_dir
        self.manifest_path = self.path / "manifest.json"
        self.path.mkdir(parents=True, exist_ok=True)
        if config.resume_from and not self.manifest_path.is_file():
            raise ConfigError(f"resume-from = {config.resume_from!r} holds no manifest.json: not a run folder")
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
            if config.resume_from:
                check_same_run(self.manifest.get("run_config", {}), config)
        else:
            self.manifest = {"run_name": config.run_name, "created": _now(), "phases": {}}
        self.manifest.update(
            {"run_config": config.to_run_config(), "versions": library_versions(), "status": "running",
             "updated": _now()}
        )
        self.save()

    def save(self) -> None:
        self.manifest["updated"] = _now()
        write_json_atomic(self.manifest_path, self.manifest)

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value
        self.save()

    def phase_status(self, phase: str) -> str:
        return self.manifest["phases"].get(phase, {}).get("status", "pending")

    def start_phase(self, phase: str) -> float:
        """Mark a phase running; an interrupted one keeps its completed rounds so it can resume.

        A phase that had completed starts from scratch (an earlier phase it depends on ran again).
        """
        entry = self.manifest["phases"].get(phase, {})
        interrupted = entry.get("status") in ("running", "failed")
        kept = {k: entry[k] for k in ("round", "history") if k in entry and interrupted}
        self.manifest["phases"][phase] = {"status": "running", "started": _now(), **kept}
        self.save()
        return time.perf_counter()

    def finish_phase(self, phase: str, started: float, **details: Any) -> None:
        entry = self.manifest["phases"][phase]
        entry.update({"status": "completed", "finished": _now(),
                      "seconds": round(time.perf_counter() - started, 2), **details})
        self.save()

    def fail_phase(self, phase: str, error: str) -> None:
        self.manifest["phases"].setdefault(phase, {}).update({"status": "failed", "error": error, "finished": _now()})
        self.manifest["status"] = "failed"
        self.save()

    def finish(self) -> None:
        self.manifest["status"] = "completed"
        self.save()

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)


#: Keys that may differ between an interrupted run and its resumption.
RESUMABLE_KEYS = frozenset({"resume-from", "output-dir", "run-name", "wait-for-nodes-s"})


def check_same_run(stored: dict, config: RunConfig) -> None:
    """Refuse to resume a run folder made with another configuration (its checkpoints would not fit)."""
    current = config.to_run_config()
    defaults = RunConfig().to_run_config()
    # A key the stored run does not know was added later; at its default it changes nothing that ran.
    differ = sorted(k for k in set(stored) | set(current)
                    if k not in RESUMABLE_KEYS and stored.get(k) != current.get(k)
                    and not (k not in stored and current.get(k) == defaults.get(k)))
    if differ:
        detail = ", ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in differ[:5])
        raise ConfigError(f"resume-from = {config.resume_from!r} was made with another configuration ({detail})")
