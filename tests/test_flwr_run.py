"""One small end-to-end `flwr run` (test preset) through the project's launcher: Ray, SuperLink and all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _superlinks() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "flower-superlink" in " ".join(p.info["cmdline"] or [])}


@pytest.mark.timeout(600)
def test_flwr_run_test_preset_completes_and_writes_the_manifest(tmp_path):
    before = _superlinks()
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run.py"), "--preset", "test", "--output-dir", str(tmp_path / "runs"),
         "--flwr-home", str(tmp_path / "flwr-home"), "--run-config", f"cache-dir='{tmp_path / 'cache'}'"],
        check=False, capture_output=True, text=True, timeout=580, env={**os.environ},
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "status: finished:completed" in log

    manifest = json.loads((tmp_path / "runs" / "test" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert len(manifest["hospitals"]) == 3
    assert manifest["partition"]["disjoint"] is True
    assert manifest["partition"]["test"]["patients"] > 0
    # the launcher stops the SuperLink it started, and only that one
    assert _superlinks() == before


def test_launcher_exits_non_zero_when_the_run_fails(tmp_path):
    # A hospital failing the setup phase fails the run inside the ServerApp: flwr run itself would exit 0.
    # (Bad settings never get that far: the launcher's preflight refuses them with exit status 2.)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run.py"), "--preset", "test", "--output-dir", str(tmp_path / "runs"),
         "--flwr-home", str(tmp_path / "flwr-home"),
         "--run-config", f"cache-dir='{tmp_path / 'cache'}' fail-hospital=0 fail-phase='setup'"],
        check=False, capture_output=True, text=True, timeout=580,
    )
    assert out.returncode != 0
    assert "finished:failed" in out.stdout + out.stderr


def test_the_launcher_stops_everything_it_started_and_nothing_else():
    """A process tree like the SuperLink's (a child in a session of its own, with a child of its own)."""
    sys.path.insert(0, str(ROOT))
    from scripts.run import stop

    bystander = subprocess.Popen(["sleep", "60"])
    tree = subprocess.Popen(["bash", "-c", "setsid bash -c 'sleep 60 & wait' & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(psutil.Process(tree.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    below = psutil.Process(tree.pid).children(recursive=True)
    assert len(below) == 2 and os.getsid(below[0].pid) != os.getsid(tree.pid)  # out of the group kill's reach

    stop(tree)

    assert not [p for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()


@pytest.mark.timeout(300)
def test_the_benchmark_script_runs_and_writes_its_schema(tmp_path):
    out = subprocess.run([sys.executable, "scripts/bench.py", "--tiny", "--out", str(tmp_path),
                          "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=280,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "versions", "targets", "compute", "audit", "memory"} <= set(results)
    assert {"vae_fp32", "vae_bf16", "unet_fp32", "unet_bf16", "matmul_gflops"} <= set(results["compute"])
    assert [r["real"] for r in results["audit"]["rows"]] == [100, 1000]
    assert results["memory"]["peak_rss_mb"] > 0
    assert "| measure | value | target | met |" in (tmp_path / "results.md").read_text()


def test_the_benchmark_compares_two_runs_phase_by_phase(tmp_path):
    from scripts.bench import before_after, before_after_markdown, phase_seconds

    for name, phases in {"old": {"train-vae": {"seconds": 600.0}, "evaluate": {"seconds": 100.0}},
                         "new": {"train-vae": {"seconds": 300.0}, "evaluate": {"seconds": 100.0},
                                 "unlearn-retrain": {"status": "running"}}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"phases": phases}))
    comparison = before_after(phase_seconds(tmp_path / "old"), phase_seconds(tmp_path / "new"))
    assert comparison["before_s"] == 700.0 and comparison["after_s"] == 400.0
    assert comparison["after_over_before"] == pytest.approx(400 / 700, abs=1e-3)
    assert [(r["phase"], r["after_over_before"]) for r in comparison["phases"]] == [("train-vae", 0.5), ("evaluate", 1.0)]
    table = before_after_markdown(comparison, "old", "new")
    assert "| train-vae | 600 | 300 | 0.5 |" in table and "| **pipeline** | 700 | 400 | 0.571 |" in table
