"""Run the ServerApp on the in-process grid from the command line: ``python -m tests.drive_run '<run config JSON>'``.

The kill-and-resume test starts this in a subprocess so that it can SIGKILL a whole run at any point.
Exits 0 when the run completed.
"""

from __future__ import annotations

import json
import sys

import torch
from flwr.app import Context, RecordDict


def main() -> int:
    torch.set_num_threads(1)  # as the test suite: the same arithmetic in every process
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    from clients.client_app import app as client_app
    from server.server_app import app as server_app
    from tests.fake_grid import FakeGrid

    run_config = json.loads(sys.argv[1])
    grid = FakeGrid(client_app, run_config, num_nodes=int(run_config["num-hospitals"]))
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
