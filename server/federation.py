"""Talking to the hospitals: wait for SuperNodes, send one message per hospital, sort the replies.

A hospital that fails (an error reply) or stays silent past ``reply-timeout-s`` does not stop a
phase: :meth:`Federation.usable` records it in ``missed`` and the phase goes on with the others, as
long as ``min-hospitals`` answered. Errors from Ray's ActorDiedError are retried once: after one
simulated hospital crashes, a healthy one's message can land on the dead actor (collateral).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_unlearn.config import RunConfig
from fl_unlearn.data.partition import hospital_name

log = logging.getLogger("fl_unlearn.server")


@dataclass
class Replies:
    """Replies of one broadcast, keyed by hospital index; failures kept apart, never dropped silently."""

    ok: dict[int, Message] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


class Federation:
    """The grid plus the node ↔ hospital map learnt in the setup phase."""

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config
        self.hospital_of_node: dict[int, int] = {}
        self.phase = ""  # stamped on every message (hospitals log it; fault injection matches it)
        self.missed: list[dict] = []  # hospitals that failed a broadcast: hospital, phase, step, error

    def wait_for_nodes(self) -> list[int]:
        """Block until ``num-hospitals`` SuperNodes are connected (simulation registers them after start)."""
        deadline = time.monotonic() + self.config.wait_for_nodes_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.num_hospitals:
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of {self.config.num_hospitals} hospitals connected within "
                    f"{self.config.wait_for_nodes_s:.0f} s; start the run with "
                    f"--federation-config \"num-supernodes={self.config.num_hospitals}\""
                )
            time.sleep(0.5)

    def send(self, message_type: str, content: dict[int, RecordDict] | RecordDict, *,
             nodes: list[int] | None = None, group_id: str = "", timeout: float | None = None) -> dict:
        """Send to nodes (default: all), return ``{node_id: reply}`` plus errors and missing nodes."""
        nodes = nodes if nodes is not None else sorted(self.grid.get_node_ids())
        targets = set(nodes)
        if timeout is None and self.config.reply_timeout_s > 0:
            timeout = self.config.reply_timeout_s
        by_node: dict[int, Message] = {}
        errors: dict[int, str] = {}
        for attempt in range(2):
            messages = []
            for node in nodes:
                body = content[node] if isinstance(content, dict) else content
                stamped = RecordDict({**body, "run": ConfigRecord({"phase": self.phase})})
                messages.append(Message(stamped, dst_node_id=node, message_type=message_type, group_id=group_id))
            for reply in self.grid.send_and_receive(messages, timeout=timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    errors[node] = f"code {reply.error.code}: {reply.error.reason}"
                else:
                    by_node[node] = reply
                    errors.pop(node, None)
            # A crashed simulated hospital takes its Ray actor down; a healthy hospital's message that lands
            # there fails with ActorDiedError too. Send those once more.
            nodes = [n for n, e in errors.items() if "ActorDiedError" in e]
            if not nodes or attempt:
                break
            log.warning("retrying %s for nodes %s after ActorDiedError", message_type, nodes)
        missing = sorted(targets - set(by_node) - set(errors))
        return {"ok": by_node, "errors": errors, "missing": missing}

    def send_to_hospitals(self, message_type: str, content: dict[int, RecordDict] | RecordDict, *,
                          group_id: str = "", timeout: float | None = None) -> Replies:
        """Like :meth:`send`, addressed and keyed by hospital index."""
        node_of = {h: n for n, h in self.hospital_of_node.items()}
        per_node = content if isinstance(content, RecordDict) else {node_of[h]: c for h, c in content.items()}
        nodes = sorted(node_of.values()) if isinstance(content, RecordDict) else sorted(per_node)
        raw = self.send(message_type, per_node, nodes=nodes, group_id=group_id, timeout=timeout)
        return Replies(
            ok={self.hospital_of_node[n]: m for n, m in raw["ok"].items()},
            errors={self.hospital_of_node[n]: e for n, e in raw["errors"].items()},
            missing=sorted(self.hospital_of_node[n] for n in raw["missing"]),
        )

    def usable(self, replies: Replies, step: str) -> dict[int, Message]:
        """The replies a phase goes on with. Failed hospitals are recorded in ``missed`` and named on the
        console; fewer than ``min-hospitals`` answers is an error."""
        failed = {**replies.errors, **{h: f"no reply within {self.config.reply_timeout_s:g} s" for h in replies.missing}}
        for h, error in sorted(failed.items()):
            self.missed.append({"hospital": hospital_name(h), "phase": self.phase, "step": step,
                                "error": _headline(error)})
            print(f"[fl-unlearn] WARNING: {hospital_name(h)} failed in {self.phase} ({step}); going on without it: "
                  f"{self.missed[-1]['error']}", flush=True)
        if len(replies.ok) < self.config.min_hospitals:
            raise RuntimeError(f"{self.phase} ({step}): {len(replies.ok)} hospital(s) answered, fewer than "
                               f"min-hospitals = {self.config.min_hospitals}; failures: {failed}")
        return replies.ok


def _headline(error: str) -> str:
    """The exception line of an error reply (its reason holds a whole traceback), at most 300 characters."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    exception = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (exception[-1] if exception else lines[-1] if lines else "error")[:300]
