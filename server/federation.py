"""Talking to the hospitals: wait for SuperNodes, send one message per hospital, sort the replies."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fl_unlearn.config import RunConfig

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
        messages = []
        for node in nodes:
            body = content[node] if isinstance(content, dict) else content
            messages.append(Message(body, dst_node_id=node, message_type=message_type, group_id=group_id))
        sent = {m.metadata.dst_node_id for m in messages}
        by_node: dict[int, Message] = {}
        errors: dict[int, str] = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors[node] = f"code {reply.error.code}: {reply.error.reason}"
            else:
                by_node[node] = reply
        missing = sorted(sent - set(by_node) - set(errors))
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
