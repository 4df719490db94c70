"""Fault injection for tests and drills: make one hospital fail in one phase, the way real sites fail.

Set in the run config: ``fail-hospital`` (index), ``fail-phase`` (a phase name, e.g. ``train-ldm``,
``audit`` or ``unlearn-kl-away``), ``fail-mode``: ``raise`` (the handler raises: an error reply),
``exit`` (the process dies: in simulation Ray reports ActorDiedError), ``hang`` (the handler sleeps
``reply-timeout-s`` + 30 s, so the server's timeout expires first).
"""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.hospital import hospital_index
from fl_unlearn.config import RunConfig


def inject_faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: fail as configured when this hospital receives a message of the chosen phase."""
    fail_hospital = int(context.run_config.get("fail-hospital", -1))
    fail_phase = str(context.run_config.get("fail-phase", ""))
    if fail_hospital < 0 or not fail_phase or "run" not in msg.content.config_records:
        return call_next(msg, context)
    phase = str(msg.content["run"].get("phase", ""))
    config = RunConfig.from_run_config(context.run_config)
    if phase == fail_phase and hospital_index(context.node_config, config.num_hospitals) == fail_hospital:
        if config.fail_mode == "exit":
            os._exit(3)
        if config.fail_mode == "hang":
            time.sleep(config.reply_timeout_s + 30)
        else:
            raise RuntimeError(f"injected failure: hospital {fail_hospital} in {phase} (fail-mode {config.fail_mode})")
    return call_next(msg, context)
