"""The deletion ledger: hash chain, final states, tampering, torn writes, and its command line."""

from __future__ import annotations

import itertools
import json

import pytest

from fl_unlearn.errors import DataError
from fl_unlearn.ledger import GENESIS, Ledger, entry_hash, main, verify


def _ledger(tmp_path, outcome: str | None = "verified") -> Ledger:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append("request", "hospital-0", "aa11", source="request")
    ledger.append("finding", "hospital-1", "bb22", source="audit", score=0.91)
    ledger.append("applied", "hospital-0", "aa11", method="kl-away", cycle=1, rounds=3)
    ledger.append("applied", "hospital-1", "bb22", method="kl-away", cycle=1, rounds=3)
    ledger.append("verified", "hospital-0", "aa11", method="kl-away", cycle=1)
    if outcome:
        ledger.append(outcome, "hospital-1", "bb22", method="kl-away", cycle=1, score=0.7)
    return ledger


def test_every_subject_reaches_a_final_state_and_the_chain_holds(tmp_path):
    ledger = _ledger(tmp_path, outcome="still-identified")
    entries = ledger.entries()

    assert entries[0]["prev"] == GENESIS and all(e["prev"] == p["hash"] for p, e in itertools.pairwise(entries))
    assert all(e["hash"] == entry_hash(e) for e in entries)
    report = verify(tmp_path)
    assert report["chain_ok"] and report["pending"] == []
    assert report["final"] == {"verified": 1, "still-identified": 1} and report["subjects"] == 2
    assert main(["verify", str(tmp_path)]) == 0


def test_a_subject_without_an_outcome_is_pending(tmp_path, capsys):
    _ledger(tmp_path, outcome=None)

    assert verify(tmp_path)["pending"] == ["hospital-1/bb22"]
    assert main(["verify", str(tmp_path)]) == 1
    assert "pending: hospital-1/bb22" in capsys.readouterr().out


def test_a_new_finding_reopens_a_subject(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.append("finding", "hospital-0", "aa11", source="audit", score=0.8, cycle=1)

    assert verify(tmp_path)["pending"] == ["hospital-0/aa11"]


@pytest.mark.parametrize("tamper", ["edit", "remove", "swap"])
def test_tampering_breaks_the_chain(tmp_path, tamper):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    if tamper == "edit":  # lower a finding's score
        entry = json.loads(lines[1])
        entry["score"] = 0.1
        lines[1] = json.dumps(entry, sort_keys=True)
    elif tamper == "remove":
        del lines[2]
    else:
        lines[2], lines[3] = lines[3], lines[2]
    ledger.path.write_text("\n".join(lines) + "\n")

    report = verify(tmp_path)
    assert not report["chain_ok"] and report["errors"]
    assert main(["verify", str(tmp_path)]) == 1


def test_a_torn_last_line_is_not_committed_and_the_next_append_replaces_it(tmp_path):
    ledger = _ledger(tmp_path)
    with open(ledger.path, "a") as fh:
        fh.write('{"seq": 6, "event": "verif')  # killed mid-write
    assert len(Ledger(ledger.path).entries()) == 6

    Ledger(ledger.path).append("request", "hospital-2", "cc33", source="request")

    assert verify(tmp_path)["chain_ok"] and len(Ledger(ledger.path).entries()) == 7


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no deletion ledger"):
        verify(tmp_path)
    assert main(["verify", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown ledger event 'deleted'"):
        Ledger(tmp_path / "ledger.jsonl").append("deleted", "hospital-0", "aa11")
    (tmp_path / "ledger.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="line 1 is not JSON"):
        verify(tmp_path)
