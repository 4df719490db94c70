"""An in-process Flower Grid: drives the ServerApp against ClientApps without Ray or a SuperLink."""

from __future__ import annotations

import itertools
import threading
import traceback
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


class FakeGrid(Grid):
    """Delivers each message synchronously to ``client_app(message, context)`` of its node.

    ``intercept`` (optional) sees every message in both directions, for privacy tests.
    """

    def __init__(self, client_app, run_config: dict, num_nodes: int,
                 intercept: Callable[[str, Message], None] | None = None) -> None:
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config))
            for i, node in enumerate(self.node_ids)
        }
        self.intercept = intercept
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.sent.append(msg)
            if self.intercept:
                self.intercept("server->client", msg)
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what the runtime does: an error reply, the run goes on
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"),
                                reply_to=msg)
            if self.intercept:
                self.intercept("client->server", reply)
            mid = f"m{next(self._ids)}"
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Synchronous without a timeout. With one, each message is handled in a thread and waited for up to
        ``timeout`` seconds (one message at a time, so hospitals do not slow each other down); as in Flower,
        a reply that is not back in time is simply absent (its thread is left to finish)."""
        if timeout is None:
            return self.pull_messages(self.push_messages(messages))
        ids: list[list[str]] = []
        for msg in messages:
            out: list[str] = []
            ids.append(out)
            worker = threading.Thread(target=lambda m=msg, o=out: o.extend(self.push_messages([m])), daemon=True)
            worker.start()
            worker.join(timeout)
        return self.pull_messages([mid for out in ids for mid in out])
