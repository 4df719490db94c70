"""What the server writes to the run's deletion ledger (``fl_unlearn.ledger``): salted tokens only.

Every subject of a forget set gets an opening entry (``request`` or ``finding``) when the set is made
or grown, an ``applied`` entry per unlearning cycle that covered it, and the re-audit's outcome.
Patients first exposed by the last cycle of a method join no forget set: the table counts them as
newly exposed; a further cycle (``unlearn-cycles``) is what acts on them.
"""

from __future__ import annotations

import pandas as pd

from fl_unlearn.ledger import FILENAME, Ledger
from fl_unlearn.runs import RunDirectory


def _ledger(run: RunDirectory) -> Ledger:
    return Ledger(run.file(FILENAME))


def _scores(run: RunDirectory, set_name: str, site: str) -> dict[str, float]:
    """The highest audit score of each token's flagged images at ``site`` in synthetic set ``set_name``."""
    table = pd.read_csv(run.file("audit", f"{set_name}.csv"), keep_default_na=False)
    flagged = table[table[f"{site}-flagged"].astype(bool)]
    return flagged.groupby(f"{site}-token")[f"{site}-score"].max().astype(float).to_dict()


def record_forget_sets(run: RunDirectory, set_name: str, audit: dict, previous: dict | None = None, **fields) -> None:
    """Open an entry for every subject that joined a forget set in this audit (all of them: ``previous`` None)."""
    ledger = _ledger(run)
    if previous is None:  # every run has a ledger, empty when nobody is to be forgotten
        ledger.path.touch()
    for site, tokens in audit["forget_tokens"].items():
        known = set(previous["forget_tokens"].get(site, [])) if previous else set()
        requested = set(audit.get("requested_tokens", {}).get(site, []))
        scores = _scores(run, set_name, site)
        for token in tokens:
            if token in known:
                continue
            if token in requested:
                ledger.append("request", site, token, source="request", set=set_name, **fields)
            else:
                ledger.append("finding", site, token, source="audit", set=set_name, score=scores.get(token), **fields)


def record_cycle(run: RunDirectory, method: str, cycle: int, rounds: int, forget_audit: dict, after_set: str,
                 after: dict, trained: set[str]) -> None:
    """One unlearning cycle: ``applied`` for every subject of the forget set it unlearned at a hospital that
    trained in it (``trained``; else ``missed``), then the re-audit's outcome (``missed`` if the hospital
    did not answer it: the subject stays pending until a later re-audit)."""
    ledger = _ledger(run)
    for site, tokens in forget_audit["forget_tokens"].items():
        for token in tokens:
            if site in trained:
                ledger.append("applied", site, token, method=method, cycle=cycle, rounds=rounds)
            else:
                ledger.append("missed", site, token, method=method, cycle=cycle, step="unlearning rounds")
        if site not in after["hospitals"]:
            for token in tokens:
                ledger.append("missed", site, token, method=method, cycle=cycle, step=f"audit of {after_set}")
            continue
        linked = set(after["linked_tokens"].get(site, []))
        scores = _scores(run, after_set, site)
        for token in tokens:
            if token in linked:
                ledger.append("still-identified", site, token, method=method, cycle=cycle, set=after_set,
                              score=scores.get(token))
            else:
                ledger.append("verified", site, token, method=method, cycle=cycle, set=after_set)
