"""The phases of a run, in order. Each takes the federation and the run directory and returns details for the manifest."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import RecordDict
from rich.console import Console
from rich.table import Table

from fl_unlearn.data.partition import hospital_name
from fl_unlearn.data.sources import load_federation
from fl_unlearn.runs import RunDirectory
from server import evaluation, generative, privacy, unlearning
from server.federation import Federation

console = Console(width=110, force_terminal=False)


def setup(federation: Federation, run: RunDirectory) -> dict:
    """Plan the partitions, learn which node is which hospital, and check each holds its planned patients."""
    config = run.config
    cohort, plan = load_federation(config)
    summary = plan.summary(cohort.table)
    if not summary["disjoint"]:
        raise RuntimeError("partition plan is not patient-disjoint; this is a bug in the partitioner")
    run.set("partition", {"source": cohort.source, "strategy": config.partition_strategy, "seed": config.seed,
                          "cohort": {"patients": int(cohort.table["patient"].nunique()), "images": len(cohort.table)},
                          **summary})
    raw = federation.send("query.describe", RecordDict())
    if raw["errors"] or raw["missing"]:
        raise RuntimeError(f"hospitals failed to describe their data: errors={raw['errors']} missing={raw['missing']}")
    reports = []
    for node, reply in raw["ok"].items():
        info, counts = reply.content["info"], reply.content["counts"]
        index = int(info["hospital-index"])
        planned = summary["hospitals"][index]
        if info["fingerprint"] != planned["fingerprint"] or int(counts["images"]) != planned["images"]:
            raise RuntimeError(f"{hospital_name(index)} holds data that differs from the partition plan")
        federation.hospital_of_node[node] = index
        reports.append({"hospital": info["hospital"], "patients": int(counts["patients"]),
                        "images": int(counts["images"]), "positives": int(counts["positives"])})
    if sorted(federation.hospital_of_node.values()) != list(range(config.num_hospitals)):
        raise RuntimeError(f"hospital indices reported {sorted(federation.hospital_of_node.values())}, "
                           f"expected 0..{config.num_hospitals - 1}")
    reports.sort(key=lambda r: r["hospital"])
    run.set("hospitals", reports)
    _print_partition(summary, reports)
    return {"hospitals": len(reports)}


def _print_partition(summary: dict, reports: list[dict]) -> None:
    table = Table(title="Hospitals (reported by each hospital; test set held by the server)")
    for col in ("site", "patients", "images", "positives", "prevalence"):
        table.add_column(col, justify="right" if col != "site" else "left")
    for r in reports:
        prev = r["positives"] / r["images"] if r["images"] else 0.0
        table.add_row(r["hospital"], str(r["patients"]), str(r["images"]), str(r["positives"]), f"{prev:.2f}")
    t = summary["test"]
    table.add_row("central test", str(t["patients"]), str(t["images"]), str(t["positives"]), f"{t['prevalence']:.2f}")
    console.print(table)


PHASES: list[tuple[str, Callable[[Federation, RunDirectory], dict | None]]] = [
    ("setup", setup),
    ("train-vae", generative.train_vae),
    ("encode", generative.encode),
    ("train-ldm", generative.train_ldm),
    ("train-reid", privacy.train_reid),
    ("generate", generative.generate),
    ("audit", privacy.audit),
]


def phases_for(config) -> list[tuple[str, Callable[[Federation, RunDirectory], dict | None]]]:
    """The run's phases: the fixed ones, one ``unlearn-<method>`` per configured method, then evaluation."""
    return [*PHASES, *unlearning.method_phases(config.methods), ("train-classifier", evaluation.train_classifier),
            ("evaluate", evaluation.evaluate)]
