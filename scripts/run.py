#!/usr/bin/env python3
"""Run the fl-unlearn Flower app offline and exit non-zero when the run fails.

Plain ``flwr run`` exits 0 even when the run fails, reuses whatever background SuperLink is
listening (with that process's environment), and leaves it running. This launcher starts its own
simulation SuperLink with the offline settings, submits the app with ``flwr run``, waits for the
final status, and stops the SuperLink it started (by process group) — and nothing else.

    python scripts/run.py                        # cpu preset (= plain `flwr run .`)
    python scripts/run.py --preset test
    python scripts/run.py --preset paper --run-config "data-root='/data/mimic-cxr-jpg/2.1.0'"
    python scripts/run.py --preset test --deployment   # real SuperLink + one SuperNode per hospital

``--deployment`` runs Flower's deployment engine on loopback instead of the simulation: one
``flower-superlink`` and one ``flower-supernode`` per hospital, each told its hospital and its own
work folder through ``--node-config`` (the same ServerApp and ClientApp, no code change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else each run tries to reinstall torch from the internet
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_hospitals(hospitals: int, cores: int) -> int:
    """Ray actors to run hospitals in: with one per core, 3 hospitals on 2 cores take two waves per round
    (the second on one core while the other idles); all 3 at once share both cores and a FedAvg round
    took 0.83 of the time (measured: three 1-thread VAE trainings, 8.5 s at once against 5.2 + 5.0 s).
    Beyond twice the cores the tail wave is small next to the rest and every extra actor costs memory."""
    return hospitals if hospitals <= 2 * cores else cores


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"flower-superlink exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"flower-superlink did not become ready on port {port} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="name in configs/ or a TOML path (default: pyproject defaults = cpu)")
    parser.add_argument("--run-config", action="append", default=[], help="extra 'key=value ...' overrides, as for flwr run")
    parser.add_argument("--output-dir", default=str(ROOT / "runs"), help="where runs/<run-name>/ is written")
    parser.add_argument("--flwr-home", default=str(ROOT / ".flwr-home"), help="FLWR_HOME for this launcher")
    parser.add_argument("--cpus-per-hospital", type=int, default=1)
    parser.add_argument("--parallel-hospitals", type=int, default=None,
                        help="how many simulated hospitals train at once (Ray is told there are this many "
                             "CPU slots); default: all of them when they are at most twice the cores, else "
                             "one per core")
    parser.add_argument("--gpus-per-hospital", type=float, default=None,
                        help="GPU share of each simulated hospital (Ray); default: the visible GPUs split evenly "
                             "between the hospitals, 0 without CUDA")
    parser.add_argument("--deployment", action="store_true",
                        help="run on a loopback SuperLink with one SuperNode per hospital instead of the simulation")
    parser.add_argument("--sites-dir", default=None,
                        help="with --deployment: parent of each SuperNode's private work folder "
                             "(default: <output-dir>/sites/hospital-<i>)")
    args = parser.parse_args(argv)
    # Stop what we started on Ctrl-C or SIGTERM, also when started in the background (where a
    # non-interactive shell makes SIGINT ignored): both unwind through the finally blocks below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    if args.gpus_per_hospital is not None and args.gpus_per_hospital > 0 and not torch.cuda.is_available():
        parser.error(f"--gpus-per-hospital {args.gpus_per_hospital:g} needs a CUDA GPU; this machine has none "
                     f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")

    from flwr.common.config import parse_config_args

    from fl_unlearn.config import PRESET_DIR, load_preset
    from fl_unlearn.errors import FlUnlearnError
    from fl_unlearn.preflight import preflight

    preset = args.preset
    if preset and not Path(preset).suffix:
        preset = str(PRESET_DIR / f"{preset}.toml")
    output_dir = str(Path(args.output_dir).expanduser().resolve())
    overrides = parse_config_args(args.run_config) if args.run_config else {}
    overrides["output-dir"] = output_dir
    try:
        config = load_preset(preset, overrides)  # validate everything before anything starts
        preflight(config)
    except FlUnlearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.gpus_per_hospital is None:
        # Hospitals share the visible GPUs evenly (Ray's fractions are soft: see the README for memory).
        gpus = torch.cuda.device_count() if config.device != "cpu" else 0
        args.gpus_per_hospital = round(min(1.0, gpus / config.num_hospitals), 4) if gpus else 0.0
        if gpus and not args.deployment:
            print(f"[fl-unlearn] {gpus} GPU(s): {args.gpus_per_hospital:g} GPU per hospital", flush=True)

    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(Path(args.flwr_home).resolve())}
    # The flwr executables of this interpreter's environment, even when it is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    connection = "fl-unlearn-local"
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # flwr run refuses a TOML file next to key=value pairs, so the preset travels as pairs too.
    pairs = {**preset_values(preset), **overrides}
    cmd = ["flwr", "run", str(ROOT), connection, "--stream",
           "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in pairs.items())]
    if not args.deployment:
        slots = args.parallel_hospitals or parallel_hospitals(config.num_hospitals, os.cpu_count() or 1)
        federation = (f"num-supernodes={config.num_hospitals} client-resources-num-cpus={args.cpus_per_hospital} "
                      f"client-resources-num-gpus={args.gpus_per_hospital} "
                      f"init-args-num-cpus={slots * args.cpus_per_hospital}")
        cmd[5:5] = ["--federation-config", federation]

    config.run_dir.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    try:
        started.append(start_logged(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation", *([] if args.deployment else ["--simulation"])],
            config.run_dir / "superlink.log", env))  # no --database: state in memory
        wait_healthy(port, started[0])
        if args.deployment:
            sites = Path(args.sites_dir or Path(output_dir) / "sites").expanduser().resolve()
            for index in range(config.num_hospitals):
                # Each SuperNode is one hospital: its index and its private folder come from its own node
                # config, and it opens its own Runtime API port (two on one host must differ).
                started.append(start_logged(
                    ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                     "--node-config", f'hospital-id={index} work-dir="{sites / f"hospital-{index}"}"'],
                    config.run_dir / f"supernode-{index}.log", env))
        run_id = stream_run(cmd, env)
        status = run_status(run_id, connection, env, config.run_dir / "manifest.json") if run_id else "not started"
    finally:
        for process in reversed(started):
            stop(process)
    print(f"[fl-unlearn] run {run_id} status: {status}", flush=True)
    if status != "finished:completed":
        return 1
    print(f"[fl-unlearn] outputs: {config.run_dir}", flush=True)
    return 0


def start_logged(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """Start one Flower process in a session of its own, appending its output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stream_run(cmd: list[str], env: dict) -> str | None:
    """Run ``flwr run --stream``, echo its log, and return the run id (None if it did not start)."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            match = re.search(r"Successfully started run (\d+)", line)
            if match:
                run_id = match.group(1)
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: stop the client we started
            proc.terminate()
            proc.wait()
    return run_id if proc.returncode == 0 else None


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started, its group and every process below it, and nothing else.

    The SuperLink starts the SuperExec in a session of its own, which starts the simulation and Ray:
    killing the SuperLink's group alone would leave them behind.
    """
    import psutil

    try:
        below = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError):  # it may have exited already (a failed start)
        os.killpg(process.pid, signal.SIGTERM)
    for child in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(below, timeout=10)
    for child in alive:  # psutil checks identity (pid and start time): never a reused pid
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def preset_values(preset: str | None) -> dict:
    if not preset:
        return {}
    import tomllib

    with open(preset, "rb") as fh:
        return tomllib.load(fh)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def run_status(run_id: str, connection: str, env: dict, manifest: Path) -> str:
    """Final status from ``flwr list`` (``--stream`` ends when the run ends, but may race the state update).

    After a long run the simulation can take a minute to tear its Ray actors down before the
    SuperLink marks the run finished; past that, the run's own manifest decides.
    """
    status = "unknown"
    for _ in range(120):
        out = subprocess.run(check=False, args=["flwr", "list", "--run-id", run_id, connection, "--format", "json"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        try:
            runs = json.loads(out.stdout).get("runs", [])
            status = runs[0]["status"] if runs else "unknown"
        except (json.JSONDecodeError, KeyError, IndexError):
            status = "unknown"
        if status.startswith("finished"):
            return status
        time.sleep(1.0)
    try:
        written = json.loads(manifest.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        written = None
    print(f"[fl-unlearn] flwr list still says {status!r}; the run's manifest says {written!r}", flush=True)
    return {"completed": "finished:completed", "failed": "finished:failed"}.get(written, status)


if __name__ == "__main__":
    sys.exit(main())
