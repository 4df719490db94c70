"""Crash and resume: SIGKILL the whole run at several points, resume it, and get the uninterrupted results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fl_unlearn.config import load_preset

ROOT = Path(__file__).resolve().parents[1]
#: Where the run is killed: as soon as the manifest shows (phase, completed rounds at least) of it running.
KILL_AT = (("train-ldm", 1), ("train-reid", 0), ("unlearn-kl-away", 0), ("evaluate", 0))
#: Columns of the results table that must be identical (wall times differ by nature).
COMPARED = ("method", "non_anon", "ua", "ua_image", "oda", "pir", "newly_exposed", "auc", "fid", "hospital_steps")


def _start(run_config: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.drive_run", json.dumps(run_config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _results(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "report" / "results.json").read_text())["rows"]
    return [{k: r.get(k) for k in COMPARED} for r in rows]


def _reached(manifest: Path, phase: str, rounds: int) -> bool:
    try:
        entry = json.loads(manifest.read_text())["phases"].get(phase, {})
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (writes are atomic renames)
        return False
    return entry.get("status") == "running" and entry.get("round", 0) >= rounds


def _kill_when(proc: subprocess.Popen, manifest: Path, phase: str, rounds: int) -> bool:
    """SIGKILL the whole run as soon as it is inside ``phase``; False if it finished first."""
    while proc.poll() is None:
        if _reached(manifest, phase, rounds):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole run, mid-write if it is writing
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_results(tmp_path):
    base = {"cache-dir": str(tmp_path / "cache"), "unlearn-methods": "kl-away", "unlearn-cycles": 1}
    reference = load_preset("test", {**base, "output-dir": str(tmp_path / "reference")})
    proc = _start(reference.to_run_config())
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    config = load_preset("test", {**base, "output-dir": str(tmp_path / "killed")})
    kills, attempts = 0, 0
    while attempts < 10:
        attempts += 1
        manifest = config.run_dir / "manifest.json"
        run_config = config.to_run_config() if not manifest.is_file() else \
            config.replace(resume_from=str(config.run_dir)).to_run_config()
        proc = _start(run_config)
        if kills < len(KILL_AT) and _kill_when(proc, manifest, *KILL_AT[kills]):
            kills += 1
            continue
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
        break

    assert kills == len(KILL_AT)
    assert json.loads((config.run_dir / "manifest.json").read_text())["status"] == "completed"
    assert _results(config.run_dir) == _results(reference.run_dir)
    for name in ("vae", "unet", "unet-kl-away"):
        assert (config.run_dir / "checkpoints" / f"{name}.safetensors").read_bytes() == \
            (reference.run_dir / "checkpoints" / f"{name}.safetensors").read_bytes(), name
