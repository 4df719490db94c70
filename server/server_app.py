"""Flower ServerApp: the coordinator. Runs the phases in order and keeps the run directory."""

from __future__ import annotations

import logging
import traceback

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_unlearn.config import RunConfig
from fl_unlearn.preflight import preflight
from fl_unlearn.runs import RunDirectory
from fl_unlearn.training.common import release_memory
from server.federation import Federation
from server.phases import phases_for

log = logging.getLogger("fl_unlearn.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_run_config(context.run_config)
    preflight(config)  # bad input fails here, before anything is written
    run = RunDirectory(config)
    print(f"[fl-unlearn] run directory: {run.path}", flush=True)
    federation = Federation(grid, config)
    federation.wait_for_nodes()
    phases = phases_for(config)
    changed_from = run.rerun_from([name for name, _ in phases])
    if changed_from:
        print(f"[fl-unlearn] settings changed since the run was made ({', '.join(sorted(run.changed))}): "
              f"running again from {changed_from}", flush=True)
    rerun = False
    for name, phase in phases:
        # setup always runs: it learns which node is which hospital. Completed phases are skipped on resume,
        # until one phase runs again: every phase after it consumes its output, so they run again too.
        # A phase whose inputs changed starts from scratch, even if an earlier session left it half done.
        fresh = rerun or name == changed_from
        rerun = fresh
        if name != "setup" and not rerun and run.phase_status(name) == "completed":
            print(f"[fl-unlearn] {name}: completed earlier, skipped", flush=True)
            continue
        started = run.start_phase(name, fresh=fresh and name != "setup")
        federation.phase, missed_before = name, len(federation.missed)
        try:
            details = phase(federation, run) or {}
        except Exception as exc:
            run.fail_phase(name, f"{type(exc).__name__}: {exc}")
            print(traceback.format_exc(), flush=True)
            raise
        finally:
            release_memory()  # the server's models of this phase (sampling, evaluation) are done
            if len(federation.missed) > missed_before:  # which hospital missed what, kept across resumes
                run.set("missed", [*run.manifest.get("missed", []), *federation.missed[missed_before:]])
        run.finish_phase(name, started, **details)
        rerun = rerun or name != "setup"
    run.finish()
    print(f"[fl-unlearn] manifest: {run.manifest_path}", flush=True)
