"""Flower's deployment engine on loopback: one SuperLink, one SuperNode per hospital, the same apps.

Each message starts a fresh ``flwr-clientapp`` process that imports torch, so a test-preset run takes
about 10 minutes on 2 cores: too long for the default suite. Run them with

    FL_UNLEARN_DEPLOYMENT=1 .venv/bin/python -m pytest tests/test_deployment.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.skipif(os.environ.get("FL_UNLEARN_DEPLOYMENT") != "1",
                                 reason="deployment runs take ~10 min; set FL_UNLEARN_DEPLOYMENT=1 to run them"),
              pytest.mark.timeout(2400)]


def _flower_processes(flwr_home: Path) -> list[psutil.Process]:
    """Flower processes started with this test's FLWR_HOME (the launcher gives every process it starts)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if ("flower-" in cmd or "flwr" in cmd) and proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _deploy(tmp_path: Path, extra: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    flwr_home = (tmp_path / "flwr-home").resolve()
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run.py"), "--preset", "test", "--deployment",
         "--output-dir", str(tmp_path / "runs"), "--flwr-home", str(flwr_home),
         "--run-config", f"cache-dir='{tmp_path / 'cache'}' {extra}"],
        check=False, capture_output=True, text=True, timeout=1800,
    )
    assert not _flower_processes(flwr_home), "the launcher left Flower processes running"
    manifest_path = tmp_path / "runs" / "test" / "manifest.json"
    return out, json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}


def test_supernodes_run_every_phase_and_keep_their_state_in_their_own_folders(tmp_path):
    out, manifest = _deploy(tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "status: finished:completed" in log
    assert manifest["status"] == "completed" and not manifest.get("missed")
    assert (tmp_path / "runs" / "test" / "report" / "results.json").is_file()
    # Each hospital's state lives in its SuperNode's work-dir, nothing under the server's run directory.
    assert not (tmp_path / "runs" / "test" / "hospitals").exists()
    for index in range(3):
        site = tmp_path / "runs" / "sites" / f"hospital-{index}" / "test"
        assert any(site.glob("*latents*")), sorted(p.name for p in site.iterdir())


def test_a_supernode_whose_clientapp_dies_is_left_out_and_the_run_completes(tmp_path):
    # The process handling hospital-2's audit exits: the SuperNode reports it crashed (error code 8) and
    # starts a fresh process for the next message, so the run goes on without it for that phase.
    out, manifest = _deploy(tmp_path, "fail-hospital=2 fail-phase='audit' fail-mode='exit' min-hospitals=2")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert manifest["status"] == "completed"
    assert any(m["hospital"] == "hospital-2" and m["phase"] == "audit" for m in manifest["missed"]), manifest["missed"]
    report = (tmp_path / "runs" / "test" / "report.md").read_text()
    assert "Hospitals that missed a step" in report
