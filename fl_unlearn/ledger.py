"""The deletion ledger: an append-only, hash-chained JSONL of every patient to forget and what became of them.

One line per event. Each entry holds the SHA-256 of the previous one (``prev``) and its own
(``hash``, over the entry without it), so an edited, removed or reordered line breaks the chain.
Subjects are (hospital, salted patient token): the ledger never holds a raw patient id.

Events:
- ``request``: a patient asked to be forgotten (source ``request``);
- ``finding``: the audit linked a synthetic image to a patient (source ``audit``, with the score);
- ``applied``: a method unlearned the subject's images (method, cycle, rounds);
- ``verified`` / ``still-identified``: the re-audit after that method (with the highest score);
- ``missed``: a hospital did not answer in a phase, so its subjects stay pending.

A subject reaches a final state with ``verified`` or ``still-identified`` after its latest
``request``/``finding``. Check a run with ``python -m fl_unlearn.ledger verify runs/<name>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from fl_unlearn.errors import DataError

GENESIS = "0" * 64
OPENING = ("request", "finding")
FINAL = ("verified", "still-identified")
EVENTS = (*OPENING, "applied", *FINAL, "missed")
FILENAME = "ledger.jsonl"


def entry_hash(entry: dict) -> str:
    """SHA-256 of the entry's canonical JSON, without its own ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Ledger:
    """Appends to ``<run>/ledger.jsonl``; each append is one ``write`` of one line, flushed and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._last: tuple[int, str] | None = None  # (seq, hash) of the last entry, read once

    def entries(self) -> list[dict]:
        """Every complete entry. A torn last line (a crash mid-write) was never committed: it is skipped."""
        if not self.path.is_file():
            return []
        complete = self.path.read_text(encoding="utf-8").split("\n")[:-1]  # after the last newline: a torn write
        entries = []
        for number, line in enumerate(complete, start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.path}: line {number} is not JSON: the ledger was edited") from exc
        return entries

    def _tail(self) -> tuple[int, str]:
        if self._last is None:
            entries = self.entries()
            self._last = (entries[-1]["seq"], entries[-1]["hash"]) if entries else (-1, GENESIS)
            data = self.path.read_bytes() if self.path.is_file() else b""
            committed = data.rfind(b"\n") + 1
            if len(data) > committed:  # drop a torn last line before appending after it
                with open(self.path, "r+b") as fh:
                    fh.truncate(committed)
        return self._last

    def append(self, event: str, hospital: str, token: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown ledger event {event!r}; known: {', '.join(EVENTS)}")
        seq, prev = self._tail()
        entry = {"seq": seq + 1, "time": datetime.now(UTC).isoformat(timespec="seconds"), "event": event,
                 "hospital": hospital, "token": token, **fields, "prev": prev}
        entry["hash"] = entry_hash(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._last = (entry["seq"], entry["hash"])
        return entry


def verify(path: str | Path) -> dict:
    """Check the chain and that every requested or found subject reached a final state.

    Returns ``{"entries", "subjects", "chain_ok", "errors", "pending", "final"}``; ``pending`` lists
    the subjects (``hospital/token``) still without an outcome after their latest request or finding.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise DataError(f"no deletion ledger at {path}")
    entries = Ledger(path).entries()
    errors, prev = [], GENESIS
    state: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if entry.get("seq") != i:
            errors.append(f"entry {i}: sequence number {entry.get('seq')} (an entry was removed or reordered)")
        if entry.get("prev") != prev:
            errors.append(f"entry {i}: does not follow entry {i - 1} (the chain is broken)")
        if entry.get("hash") != entry_hash(entry):
            errors.append(f"entry {i}: its hash does not match its content (it was edited)")
        prev = entry.get("hash", "")
        subject = f"{entry.get('hospital')}/{entry.get('token')}"
        if entry.get("event") in OPENING:
            state[subject] = "pending"
        elif entry.get("event") in FINAL and subject in state:
            state[subject] = entry["event"]
    pending = sorted(s for s, v in state.items() if v == "pending")
    return {"entries": len(entries), "subjects": len(state), "chain_ok": not errors, "errors": errors,
            "pending": pending, "final": {k: sum(v == k for v in state.values()) for k in FINAL}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_unlearn.ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check the chain and that every request reached a final state")
    check.add_argument("run", help="a run folder (or its ledger.jsonl)")
    args = parser.parse_args(argv)
    try:
        report = verify(args.run)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report['entries']} entries, {report['subjects']} subjects: "
          f"{report['final']['verified']} verified, {report['final']['still-identified']} still identified, "
          f"{len(report['pending'])} pending; chain {'intact' if report['chain_ok'] else 'BROKEN'}")
    for line in report["errors"] + [f"pending: {s}" for s in report["pending"]]:
        print(f"  {line}")
    return 0 if report["chain_ok"] and not report["pending"] else 1


if __name__ == "__main__":
    sys.exit(main())
