"""Shared fixtures: Flower task identity for messages built outside a runtime, and small configs."""

from __future__ import annotations

import pytest
import torch

from fl_unlearn.config import load_preset

# Test models are tiny: one thread is as fast, and immune to oversubscription when other jobs share the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _flower_task_identity():
    # Building a flwr Message outside a Flower runtime needs the (internal) task identity.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture
def test_config(tmp_path):
    """The `test` preset writing into a temporary folder."""
    return load_preset("test", {"output-dir": str(tmp_path / "runs"), "cache-dir": str(tmp_path / "cache")})
