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
        #: Settings changed since the run was made, each with the first phase it affects (see ``rerun_from``).
        self.changed: dict[str, str] = {}
        if config.resume_from and not self.manifest_path.is_file():
            raise ConfigError(f"resume-from = {config.resume_from!r} holds no manifest.json: not a run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
            if config.resume_from:
                self.changed = check_same_run(self.manifest.get("run_config", {}), config)
        else:
            self.manifest = {"run_name": config.run_name, "created": _now(), "phases": {}}
        if self.changed:
            self.manifest.setdefault("resumed", []).append({"at": _now(), "changed": {
                k: [self.manifest["run_config"].get(k), config.to_run_config().get(k)] for k in sorted(self.changed)}})
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

    def rerun_from(self, phases: list[str]) -> str | None:
        """The first of ``phases`` (in run order) that a changed setting affects, or None."""
        for name in phases:
            if any(name == p or (p.endswith("-") and name.startswith(p)) for p in self.changed.values()):
                return name
        return None

    def start_phase(self, phase: str, *, fresh: bool = False) -> float:
        """Mark a phase running; an interrupted one keeps its completed rounds so it can resume.

        A phase that had completed, or ``fresh``, starts from scratch (its settings or an earlier phase changed).
        """
        entry = self.manifest["phases"].get(phase, {})
        interrupted = entry.get("status") in ("running", "failed") and not fresh
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
RESUMABLE_KEYS = frozenset({"resume-from", "output-dir", "run-name", "wait-for-nodes-s", "min-hospitals",
                            "reply-timeout-s", "fail-hospital", "fail-phase", "fail-mode", "device"})


#: The first phase each setting affects (by exact key or by prefix). Resuming with one of them changed
#: runs that phase and every later one again; earlier phases and their checkpoints are kept. Settings
#: absent here (seed, data, partition, cohort) change what every phase saw and cannot be changed on resume.
PHASE_OF_SETTING: tuple[tuple[str, str], ...] = (
    ("bf16", "train-vae"), ("vae-", "train-vae"),
    ("ldm-patients", ""), ("unet-", "train-ldm"), ("ldm-", "train-ldm"),
    ("reid-", "train-reid"),
    ("num-synthetic", "generate"), ("sample-", "generate"), ("guidance-scale", "generate"),
    ("audit-", "audit"), ("deletion-requests", "audit"),
    ("unlearn-", "unlearn-"), ("kl-cap", "unlearn-"), ("siss-", "unlearn-"), ("saliency-fraction", "unlearn-"),
    ("classifier-", "train-classifier"),
    ("fid-inception-weights", "evaluate"), ("catalog-method", "evaluate"),
)


def phase_of_setting(key: str) -> str:
    """The first phase ``key`` affects ("unlearn-" for the first unlearning phase), or "" if it affects all."""
    for prefix, phase in PHASE_OF_SETTING:
        if key == prefix or (prefix.endswith("-") and key.startswith(prefix)):
            return phase
    return ""


def check_same_run(stored: dict, config: RunConfig) -> dict[str, str]:
    """Refuse to resume a run folder whose completed phases a changed setting would invalidate.

    Returns the changed settings that only affect later phases, each with the first phase it affects.
    """
    current = config.to_run_config()
    defaults = RunConfig().to_run_config()
    # A key the stored run does not know was added later; at its default it changes nothing that ran.
    differ = sorted(k for k in set(stored) | set(current)
                    if k not in RESUMABLE_KEYS and stored.get(k) != current.get(k)
                    and not (k not in stored and current.get(k) == defaults.get(k)))
    fixed = [k for k in differ if not phase_of_setting(k)]
    if fixed:
        detail = ", ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in fixed[:5])
        raise ConfigError(f"resume-from = {config.resume_from!r} was made with another configuration ({detail}); "
                          f"these settings change every phase: start a new run instead")
    return {k: phase_of_setting(k) for k in differ}
